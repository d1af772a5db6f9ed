"""Two replicas of the default model behind a real nginx, scraped by a real Prometheus.

Each replica is a real launcher pinned to its own CPU, as docs/deployment.md sizes them. Under a
streaming load through nginx:
- a rolling restart (SIGTERM, drain, restart; one replica, then the other) fails no request;
- a SIGKILLed replica loses at most the requests it had in flight, and every request that starts
  once it is gone succeeds through the other;
- Prometheus answers the queries operators ask (request rate, latency quantiles, queue and batch by
  replica), and every panel of deploy/grafana/ember-dashboard.json returns data.

nginx and Prometheus come from Debian (`make deploy-tools`); without them the module skips.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import load
import pytest
from servers import Launcher, free_port, http_ok, wait_for

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "ember-dashboard.json"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("nginx") and shutil.which("prometheus")),
        reason="needs nginx and prometheus (Debian packages: `make deploy-tools` installs them)",
    ),
]

PROMPTS = [
    "Write one sentence about the sea.",
    "List three colours.",
    "The capital of France is",
    "Once upon a time",
    "Explain what a load balancer does.",
    "Count from one to ten:",
]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Replica:
    """One `ember-launcher` serving the default model on its own port and CPU."""

    name: str
    port: int
    uds: str
    cpus: set[int]
    launcher: Launcher | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = ["--model-id", "smollm2", "--hostname", "127.0.0.1", "--port", str(self.port)]
        args += ["--shard-uds-path", self.uds, "--graceful-termination-timeout", "120"]
        self.launcher = Launcher(*args, cpus=self.cpus)
        self.launcher.wait_for_line("[launcher] serving ", timeout=300)

    def successes(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(r"^tgi_request_success(?:\{[^}]*\})? (\S+)$", text, re.M))

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.kill()


@dataclass
class Sent:
    """One request of the load: when it started, what the client saw."""

    started: float
    result: load.RequestResult
    ended: float | None = None

    @property
    def ok(self) -> bool:
        r = self.result
        return r.completed and r.error is None and r.reported_tokens is not None and r.tokens > 0


@dataclass
class Load:
    """A bounded streaming load through the balancer: `concurrency` clients, each sending TGI streaming
    requests one after another until stopped, through benchmarks/load.py's client code."""

    url: str
    concurrency: int = 4
    max_new_tokens: int = 24
    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(180)
        assert not self._thread.is_alive(), "the load did not stop"

    def finished(self) -> list[Sent]:
        return [s for s in list(self.sent) if s.ended is not None]

    async def _run(self) -> None:
        timeout = httpx.Timeout(120, connect=10)
        limits = httpx.Limits(max_connections=self.concurrency + 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(self.concurrency)))

    async def _client(self, http: httpx.AsyncClient, i: int) -> None:
        api = load.APIS["tgi"]
        n = i
        while not self._stop.is_set():
            sent = Sent(time.monotonic(), load.RequestResult())
            self.sent.append(sent)
            body = api.body(PROMPTS[n % len(PROMPTS)], self.max_new_tokens, "")
            try:
                await load.stream_request(http, api, body, sent.result)
            except (httpx.HTTPError, RuntimeError, ValueError, OSError) as exc:
                sent.result.error = f"{type(exc).__name__}: {exc}"
            sent.ended = time.monotonic()
            n += self.concurrency


NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"


def nginx_conf(replicas: list[Replica], port: int) -> str:
    """docker-compose.yml's nginx configuration, pointed at the replicas here and listening on `port`."""
    conf = NGINX_CONF.read_text()
    for i, replica in enumerate(replicas, 1):
        conf, n = re.subn(rf"server ember-{i}:80\b", f"server 127.0.0.1:{replica.port}", conf)
        assert n == 1, f"deploy/nginx/nginx.conf names no upstream ember-{i}:80"
    conf, n = re.subn(r"listen 80;", f"listen 127.0.0.1:{port};", conf)
    assert n == 1
    return conf.replace("access_log /dev/stdout", "access_log stderr")


PROMETHEUS_DIR = REPO / "deploy" / "prometheus"


def prometheus_conf(replicas: list[Replica], into: Path) -> Path:
    """docker-compose.yml's Prometheus configuration (with its alert rules), scraping the replicas here
    every second."""
    conf = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    for i, replica in enumerate(replicas, 1):
        conf, n = re.subn(rf"\bember-{i}:80\b", f"127.0.0.1:{replica.port}", conf)
        assert n == 1, f"deploy/prometheus/prometheus.yml scrapes no ember-{i}:80"
    conf = re.sub(r"scrape_interval: \S+", "scrape_interval: 1s", conf)
    conf = re.sub(r"scrape_timeout: \S+", "scrape_timeout: 1s", conf)
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", into / "alerts.yml")
    (into / "prometheus.yml").write_text(conf)
    return into / "prometheus.yml"


@dataclass
class Stack:
    replicas: list[Replica]
    balancer: str
    prometheus: str


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def stack(smollm2_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("lb")
    cpus = sorted(os.sched_getaffinity(0))
    replicas = [Replica(f"r{i}", free_port(), str(base / f"r{i}"), {cpus[i % len(cpus)]}) for i in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for replica in replicas:
            replica.start()
        nginx_port = free_port()
        conf = base / "nginx.conf"
        conf.write_text(nginx_conf(replicas, nginx_port))
        directives = f"daemon off; pid {base / 'nginx.pid'};"
        cmd = ["nginx", "-p", str(base), "-e", str(base / "error.log"), "-c", str(conf), "-g", directives]
        procs.append(_spawn(cmd, base / "nginx.out"))
        balancer = f"http://127.0.0.1:{nginx_port}"
        wait_for(lambda: http_ok(balancer + "/health"), 30, "nginx", procs[-1])

        prom_port = free_port()
        prom_conf = prometheus_conf(replicas, base)
        cmd = ["prometheus", f"--config.file={prom_conf}", f"--storage.tsdb.path={base / 'tsdb'}"]
        cmd += [f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]
        procs.append(_spawn(cmd, base / "prometheus.out"))
        prometheus = f"http://127.0.0.1:{prom_port}"
        wait_for(lambda: http_ok(prometheus + "/-/ready"), 60, "prometheus", procs[-1])
        yield Stack(replicas, balancer, prometheus)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for replica in replicas:
            replica.stop()


def _query(prometheus: str, expr: str) -> list[dict]:
    reply = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def _by_instance(prometheus: str, expr: str, replicas: list[Replica]) -> dict[str, float] | None:
    """The query's value per replica, once every replica has a finite one (else None)."""
    values = {r["metric"].get("instance"): float(r["value"][1]) for r in _query(prometheus, expr)}
    wanted = {f"127.0.0.1:{r.port}" for r in replicas}
    if not wanted <= values.keys() or any(v != v for k, v in values.items() if k in wanted):
        return None
    return values


OPERATOR_QUERIES = {
    "request rate": "sum by (instance) (rate(tgi_request_count[1m]))",
    "TTFT p90": "histogram_quantile(0.9, sum by (instance, le) (rate(ember_time_to_first_token_seconds_bucket[1m])))",
    "ITL p90": "histogram_quantile(0.9, sum by (instance, le) (rate(ember_inter_token_latency_seconds_bucket[1m])))",
    "queue size": "max by (instance) (tgi_queue_size)",
    "batch size": "max by (instance) (tgi_batch_current_size)",
}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, Grafana's variables given the values a
    dashboard over all replicas gives them."""
    board = json.loads(DASHBOARD.read_text())
    panels = [p for row in board["panels"] for p in [row, *row.get("panels", [])]]
    out = []
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$instance", ".*")):
                expr = expr.replace(var, value)
            expr = expr.replace("${instance}", ".*")
            out.append((panel.get("title", ""), expr))
    return out


def test_prometheus_scrapes_both_replicas_and_every_dashboard_panel_has_data(stack):
    with Load(stack.balancer) as running:
        # Round robin: both replicas serve the load.
        wait_for(lambda: all(r.successes() >= 3 for r in stack.replicas), 120, "both replicas serving")
        for what, expr in OPERATOR_QUERIES.items():
            values = wait_for(lambda expr=expr: _by_instance(stack.prometheus, expr, stack.replicas), 60, what)
            assert all(v >= 0 for v in values.values()), (what, values)
        assert _by_instance(stack.prometheus, OPERATOR_QUERIES["request rate"], stack.replicas)
        # The alert rules loaded into the real server, and evaluated without error.
        groups = httpx.get(stack.prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert rules and all(rule["health"] in ("ok", "unknown") for rule in rules), rules
        queries = dashboard_queries()
        assert len(queries) >= 8
        empty = []
        for title, expr in queries:
            if not _query(stack.prometheus, expr):
                empty.append((title, expr))
        assert not empty, f"dashboard panels without data: {empty}"
    assert all(s.ok for s in running.finished()), [s.result.error for s in running.finished() if not s.ok][:3]


def _long_stream(replica: Replica, out: dict) -> threading.Thread:
    """A long streaming request straight to `replica`, so it has one in flight when SIGTERM comes;
    `out["started"]` is set once its first token arrived."""
    out["started"] = threading.Event()

    def run() -> None:
        body = {"inputs": "Tell a long story.", "parameters": {"max_new_tokens": 160, "ignore_eos": True}}
        events = []
        with httpx.stream("POST", replica.url + "/generate_stream", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    out["started"].set()
        out["events"] = events

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _health(replica: Replica) -> int:
    try:
        return httpx.get(replica.url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_rolling_restart_fails_no_request(stack):
    with Load(stack.balancer) as running:
        wait_for(lambda: len(running.finished()) >= 8, 120, "load flowing")
        for replica in stack.replicas:
            long: dict = {}
            streamer = _long_stream(replica, long)
            assert long["started"].wait(60), "the long request started"
            replica.launcher.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # Not ready at once, while the long request still runs.
            wait_for(lambda r=replica: _health(r) == 503, 10, f"{replica.name} not ready")
            assert streamer.is_alive()
            streamer.join(120)
            last_request_ended = time.monotonic()
            assert long["events"][-1]["details"]["generated_tokens"] == 160  # finished, not cut
            assert replica.launcher.wait_exit(120) == 0
            exited = time.monotonic()
            drain, tail = exited - signalled, exited - last_request_ended
            print(f"{replica.name}: SIGTERM to exit {drain:.1f} s, {tail:.1f} s after its last request ended")
            # The drain ends with the last request in flight, not with the grace period (120 s).
            assert tail < 30
            assert not listening(replica.port)
            before = len(running.finished())
            replica.start()
            # Back in the pool: nginx sends it traffic again.
            wait_for(lambda r=replica: r.successes() >= 2, 120, f"{replica.name} serving again")
            wait_for(lambda b=before: len(running.finished()) >= b + 4, 120, "load flowing")
    done = running.finished()
    failed = [s.result.error for s in done if not s.ok]
    print(f"rolling restart: {len(done)} requests through nginx, {len(failed)} failed")
    assert len(done) >= 20
    assert not failed, failed[:5]


def test_a_sigkilled_replica_loses_only_its_in_flight_requests(stack):
    victim, survivor = stack.replicas
    with Load(stack.balancer) as running:
        wait_for(lambda: victim.successes() >= 2 and survivor.successes() >= 2, 120, "both serving")
        killed_at = time.monotonic()
        in_flight = [s for s in list(running.sent) if s.ended is None]
        victim.launcher.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: not listening(victim.port), 30, "the killed replica's port closed")
        gone_at = time.monotonic()
        wait_for(lambda: sum(s.started > gone_at for s in running.finished()) >= 12, 120, "load after the kill")
    lost = [s for s in running.finished() if not s.ok]
    after = [s for s in running.finished() if s.started > gone_at]
    print(f"SIGKILL: {len(in_flight)} requests in flight at the kill, {len(lost)} lost; {len(after)} sent after it")
    assert all(s.ok for s in after), [s.result.error for s in after if not s.ok][:3]
    assert all(s.started <= gone_at for s in lost)
    assert len(lost) <= len([s for s in in_flight if s.started <= killed_at]) + len(
        [s for s in running.sent if killed_at < s.started <= gone_at]
    )
    # The killed launcher's children died with it (the port is closed, no router answers).
    assert victim.launcher.wait_exit(10) == -signal.SIGKILL
