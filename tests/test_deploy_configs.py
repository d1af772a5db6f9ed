"""The deployment files, checked offline with the real tools (deploy/tools.sh installs them).

Kubernetes: kustomize (kubectl's) renders the base and each overlay, and kubernetes-validate checks every
object against Kubernetes' own OpenAPI schemas; the Prometheus operator's ServiceMonitor is a CRD, outside
those schemas, so it is checked here field by field. docker-compose.yml: `docker-compose config`. Alerts:
`promtool check rules` and `promtool test rules`. nginx: `nginx -t`, then the proxy itself in front of two
stand-in replicas on the loopback. The Grafana dashboard: its JSON, and each query evaluated by promtool
over made-up series shaped like Ember's /metrics.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from ember import settings
from ember.router.metrics import Histogram, duration_buckets

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
TOOLS = ROOT / ".venv-deploy"
# The oldest Kubernetes the manifests claim to work on, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")
RENDERS = ("base", "overlays/gpu", "overlays/pvc")
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# What the router exposes (histograms as their base name).
HISTOGRAMS = {
    "tgi_request_duration",
    "tgi_request_queue_duration",
    "tgi_request_inference_duration",
    "tgi_request_mean_time_per_token_duration",
    "tgi_request_generated_tokens",
    "tgi_request_input_length",
    "tgi_batch_inference_duration",
    "ember_time_to_first_token_seconds",
    "ember_inter_token_latency_seconds",
}
COUNTERS = {"tgi_request_count", "tgi_request_success", "tgi_request_failure", "ember_http_requests_total"}
COUNTERS |= {"ember_prompt_tokens_total"}
GAUGES = {"tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens", "tgi_batch_max_total_tokens"}
GAUGES |= {"ember_kv_cache_usage_ratio", "ember_draining", "ember_models_loaded"}
METRICS = HISTOGRAMS | COUNTERS | GAUGES


def _tool(name: str, venv: str | None = None) -> str:
    """The pinned tool from .venv-deploy/VENV, else one on PATH; skip when neither is there."""
    pinned = TOOLS / venv / "bin" / name if venv else None
    if pinned is not None and pinned.exists():
        return str(pinned)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.skip(f"{name} is not installed and deploy/tools.sh could not install it (run it to see why)")
    return found


def _run(*argv: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _ok(*argv: str, **kw) -> str:
    proc = _run(*argv, **kw)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _env_names() -> set[str]:
    """Every environment variable the launcher reads for a setting (TGI's names where TGI has them)."""
    return {name for s in settings.SETTINGS if not s.internal for name in s.env_names}


# --- Kubernetes -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    kubectl = _tool("kubectl", "k8s")
    return {name: list(yaml.safe_load_all(_ok(kubectl, "kustomize", str(KUSTOMIZE / name)))) for name in RENDERS}


def _one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _container(objects: list[dict]) -> dict:
    return _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.parametrize("name", RENDERS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_validate_against_the_api_schemas(rendered, tmp_path, name, version):
    validate = _tool("kubernetes-validate", "k8s")
    objects = rendered[name]
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    proc = _run(validate, "--strict", "-k", version, str(manifest))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    core = [o for o in objects if (o["apiVersion"], o["kind"]) not in CRDS]
    passed = re.findall(r"passed for resource (\S+) against", proc.stdout)
    assert sorted(passed) == sorted(f"{o['kind'].lower()}/{o['metadata']['name']}" for o in core)
    unknown = re.findall(r"Couldn't find schema for kind (\w+)", proc.stdout + proc.stderr)
    assert set(unknown) <= {kind for _, kind in CRDS}


def test_base_has_the_whole_service(rendered):
    kinds = sorted(o["kind"] for o in rendered["base"])
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ServiceMonitor"]
    assert _container(rendered["base"])["image"] == "ember:latest"


def test_every_env_var_is_a_setting_of_the_launcher(rendered):
    known = _env_names() | {"HF_TOKEN"}
    for name in RENDERS:
        unknown = set(_env(_container(rendered[name]))) - known
        assert not unknown, f"{name}: not settings of common/settings.py: {unknown}"


def test_probes_fit_what_they_guard(rendered):
    container = _container(rendered["base"])
    startup, ready, live = container["startupProbe"], container["readinessProbe"], container["livenessProbe"]
    # The launcher allows the shards 600 s and the router 300 s before giving up: the probe must wait as long.
    limit = settings.default("shard-startup-timeout") + settings.default("router-startup-timeout")
    assert startup["periodSeconds"] * startup["failureThreshold"] >= limit
    assert startup["httpGet"]["path"] == ready["httpGet"]["path"] == "/health"
    # Liveness asks nothing of the shards, and gives a busy pod a minute at least.
    assert live["httpGet"]["path"] in ("/info", "/metrics")
    assert live["periodSeconds"] * live["failureThreshold"] >= 60 and live["timeoutSeconds"] >= 5


def test_termination_grace_covers_prestop_and_the_drain(rendered):
    pod = _one(rendered["base"], "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = float(_env(container)["GRACEFUL_TERMINATION_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + drain + 10


def test_resources_are_guaranteed_whole_cpus(rendered):
    for name in RENDERS:
        resources = _container(rendered[name])["resources"]
        assert resources["requests"] == resources["limits"], name
        assert re.fullmatch(r"\d+", str(resources["limits"]["cpu"])), name


def test_volumes(rendered):
    def volumes(name):
        return {v["name"]: v for v in _one(rendered[name], "Deployment")["spec"]["template"]["spec"]["volumes"]}

    mounts = {m["mountPath"]: m["name"] for m in _container(rendered["base"])["volumeMounts"]}
    assert volumes("base")[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert set(volumes("base")[mounts["/data"]]) == {"name", "emptyDir"}
    cache = volumes("overlays/pvc")[mounts["/data"]]
    assert set(cache) == {"name", "persistentVolumeClaim"}, "a volume has exactly one source"
    claim = _one(rendered["overlays/pvc"], "PersistentVolumeClaim")
    assert cache["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "every replica mounts the same claim"


def test_gpu_overlay_runs_one_shard_per_gpu(rendered):
    container = _container(rendered["overlays/gpu"])
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(_env(container)["NUM_SHARD"]) == int(gpus) >= 1
    assert container["image"] == "ember:cuda"


def test_selectors_and_ports_meet(rendered):
    objects = rendered["base"]
    pod_labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert _one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port = service["spec"]["ports"][0]
    assert port["port"] == 80 and port["targetPort"] in {p["name"] for p in _container(objects)["ports"]}
    # The CRD, checked here: it selects the Service and scrapes its named port.
    monitor = _one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "jobLabel", "namespaceSelector"}


def test_autoscaler_metric_is_served_by_the_adapter_rule(rendered):
    hpa = _one(rendered["base"], "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one(rendered["base"], "Deployment")["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "tgi_queue_size"
    assert hpa["spec"]["minReplicas"] >= 2, "with the PodDisruptionBudget, a drain must leave one serving"
    rules = yaml.safe_load((KUSTOMIZE / "base" / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    served = [r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    assert len(served) == 1
    rule = served[0]
    assert rule["seriesQuery"].startswith("tgi_queue_size{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "sum by (<<.GroupBy>>)" in rule["metricsQuery"], "a pod's models are summed into one value"


# --- docker-compose ---------------------------------------------------------------------------------------------


def _compose_config(**env: str) -> dict:
    compose = _tool("docker-compose", "compose")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("EMBER_", "COMPOSE_"))}
    out = _ok(compose, "-f", str(ROOT / "docker-compose.yml"), "config", env={**clean, **env})
    return yaml.safe_load(out)


def _seconds(text: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", text))


def _cpus(cpuset: str) -> set[int]:
    cpus: set[int] = set()
    for part in cpuset.split(","):
        low, _, high = part.partition("-")
        cpus |= set(range(int(low), int(high or low) + 1))
    return cpus


def test_compose_runs_two_replicas_on_their_own_cpus():
    services = _compose_config()["services"]
    assert set(services) == {"ember-1", "ember-2", "nginx", "prometheus"}
    replicas = [services["ember-1"], services["ember-2"]]
    for replica in replicas:
        env = replica["environment"]
        assert replica["image"] == "ember:latest" and Path(replica["build"]["context"]) == ROOT
        assert float(replica["cpus"]) == int(env["OMP_NUM_THREADS"]) == len(_cpus(replica["cpuset"]))
        assert set(env) <= _env_names() | {"HF_TOKEN"}
        assert _seconds(replica["stop_grace_period"]) > float(env["GRACEFUL_TERMINATION_TIMEOUT"])
        assert "/health" in " ".join(replica["healthcheck"]["test"])
    assert not _cpus(replicas[0]["cpuset"]) & _cpus(replicas[1]["cpuset"])
    assert replicas[0]["volumes"] == replicas[1]["volumes"], "one model cache for both"


def test_compose_threads_follow_the_cpus_given():
    services = _compose_config(EMBER_CPUS="4", EMBER_1_CPUS="0-3", EMBER_2_CPUS="4-7")["services"]
    for name in ("ember-1", "ember-2"):
        assert float(services[name]["cpus"]) == int(services[name]["environment"]["OMP_NUM_THREADS"]) == 4


def test_compose_mounts_the_files_that_point_at_the_replicas():
    services = _compose_config()["services"]
    sources = {Path(v.split(":")[0]) for s in services.values() for v in s.get("volumes", []) if v.startswith("/")}
    assert DEPLOY / "nginx" / "nginx.conf" in sources and DEPLOY / "prometheus" / "prometheus.yml" in sources
    assert all(path.exists() for path in sources)
    replicas = {f"{name}:80" for name in ("ember-1", "ember-2")}
    upstreams = re.findall(r"^\s*server\s+([^\s{;]+)", (DEPLOY / "nginx" / "nginx.conf").read_text(), re.M)
    assert set(upstreams) == replicas
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    ember = next(job for job in scrape if job["job_name"] == "ember")
    assert set(ember["static_configs"][0]["targets"]) == replicas


# --- Prometheus: config and alerts -------------------------------------------------------------------------------


def test_prometheus_config_and_rules_check():
    promtool = _tool("promtool")
    assert "SUCCESS" in _ok(promtool, "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in _ok(promtool, "check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus")


def test_alerts_fire_on_made_up_series():
    promtool = _tool("promtool")
    assert "SUCCESS" in _ok(promtool, "test", "rules", "alerts.test.yml", cwd=DEPLOY / "prometheus")


def test_alerts_use_a_bucket_bound_the_router_writes():
    """The TTFT objective's `le` must be a bound exactly as /metrics spells it, or the ratio is empty."""
    histogram = Histogram("x", "", duration_buckets())
    histogram.observe(1.0)
    written = set(re.findall(r'le="([^"]+)"', "\n".join(histogram.render())))
    used = set(re.findall(r'le="([^"]+)"', (DEPLOY / "prometheus" / "alerts.yml").read_text()))
    assert used and used <= written


def test_alerts_use_only_exposed_metrics():
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    assert _metric_names(text) <= METRICS


# --- nginx --------------------------------------------------------------------------------------------------------


class Replica:
    """A stand-in Ember replica on the loopback, recording what reached it. Modes: "ok" (200), "503" (a refusal
    before any work, as Ember's), "reset" (reads the request, then closes the connection: a crash mid-request)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"
        self.requests: list[tuple[str, str, str]] = []
        self.connections: set[tuple[str, int]] = set()
        self.release = threading.Event()
        self.released_in_time: bool | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def count(self, method: str) -> int:
        return sum(1 for m, _, _ in self.requests if m == method)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _handler(replica: Replica) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            replica.requests.append((self.command, self.path, self.request_version))
            replica.connections.add(self.client_address)
            if self.path == "/stream":
                self._stream()
                return
            if replica.mode == "reset":
                self.close_connection = True
                return
            status = 503 if replica.mode == "503" else 200
            body = json.dumps({"replica": replica.name, "status": status}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _stream(self) -> None:
            """One event, then (once the client has it, or after 10 s) the last one."""
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            self._chunk(b"data: first\n\n")
            replica.released_in_time = replica.release.wait(10)
            self._chunk(b"data: last\n\n")
            self.wfile.write(b"0\r\n\r\n")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nginx_conf(tmp_path: Path, port: int, upstreams: list[str]) -> Path:
    """deploy/nginx/nginx.conf with the replicas' and its own addresses on the loopback."""
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    servers = iter(upstreams)
    text, n = re.subn(r"(server\s+)ember-\d:80", lambda m: m.group(1) + next(servers), text)
    assert n == len(upstreams)
    text, n = re.subn(r"listen\s+80;", f"listen 127.0.0.1:{port};", text)
    assert n == 1
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    return conf


@pytest.fixture
def proxy(tmp_path):
    """Start nginx (daemonized: its sockets listen once the command returns) in front of `upstreams`."""
    nginx = _tool("nginx")
    replicas = [Replica("ember-1"), Replica("ember-2")]
    pid_files: list[Path] = []

    def start(upstreams: list[str] | None = None) -> int:
        port = _free_port()
        conf = _nginx_conf(tmp_path, port, upstreams or [r.address for r in replicas])
        pid_files.append(tmp_path / "nginx.pid")
        argv = [nginx, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")]
        with open(tmp_path / "nginx.out", "w") as out:
            proc = subprocess.run(argv + ["-g", f"pid {pid_files[-1]};"], stdout=out, stderr=out, timeout=30)
        assert proc.returncode == 0, (tmp_path / "nginx.out").read_text()
        return port

    yield start, replicas
    for pid_file in pid_files:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)  # the master this test started
    for replica in replicas:
        replica.close()


def _request(port: int, method: str, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        body = b'{"inputs": "Hello"}' if method == "POST" else None
        conn.request(method, path, body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        replica_said = (response.getheader("content-type") or "").startswith("application/json")
        return response.status, json.loads(body) if replica_said else {}  # ({} for nginx's own pages)
    finally:
        conn.close()


def test_nginx_config_is_valid(tmp_path):
    nginx = _tool("nginx")
    conf = _nginx_conf(tmp_path, _free_port(), ["127.0.0.1:1", "127.0.0.1:2"])
    argv = [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")]
    proc = _run(*argv, "-g", f"pid {tmp_path / 'nginx.pid'};")
    assert proc.returncode == 0 and "test is successful" in proc.stderr, proc.stderr
    # What the behaviour tests below cannot tell apart on one small event: nothing held back for buffering.
    directives = set(re.findall(r"^\s*(proxy_\w+ [^;]*);", conf.read_text(), re.M))
    assert {"proxy_buffering off", "proxy_cache off", "proxy_http_version 1.1"} <= directives


def test_nginx_round_robin_over_http11_keepalive(proxy):
    start, replicas = proxy
    port = start()
    answers = [_request(port, "POST", "/generate") for _ in range(8)]
    assert all(status == 200 for status, _ in answers)
    assert all(r.count("POST") > 0 for r in replicas) and sum(r.count("POST") for r in replicas) == 8
    assert {version for r in replicas for _, _, version in r.requests} == {"HTTP/1.1"}
    # Connections to the replicas are reused (at most one per worker and replica), not one per request.
    assert sum(len(r.connections) for r in replicas) < 8


def test_nginx_retries_a_get_answered_503(proxy):
    start, (draining, serving) = proxy
    draining.mode = "503"
    port = start()
    answers = [_request(port, "GET", "/health") for _ in range(4)]
    assert [status for status, _ in answers] == [200] * 4
    assert {a["replica"] for _, a in answers} == {"ember-2"}
    assert draining.count("GET") >= 1, "the first request went to ember-1 and was passed on"


def test_nginx_resends_a_post_refused_with_503(proxy):
    """Ember answers 503 before doing anything: the POST goes to the other replica, once."""
    start, (draining, serving) = proxy
    draining.mode = "503"
    port = start()
    answers = [_request(port, "POST", "/generate") for _ in range(4)]
    assert answers == [(200, {"replica": "ember-2", "status": 200})] * 4
    assert draining.count("POST") >= 1 and serving.count("POST") == 4


def test_nginx_sends_a_post_that_failed_before_its_answer_once_more_to_the_other_replica(proxy):
    """A replica that failed before answering: the POST goes to the other one, once (two tries in all)."""
    start, (crashing, serving) = proxy
    crashing.mode = "reset"
    port = start()
    answers = [_request(port, "POST", "/generate") for _ in range(4)]
    assert answers == [(200, {"replica": "ember-2", "status": 200})] * 4
    assert serving.count("POST") == 4 and 1 <= crashing.count("POST") <= 4


def test_nginx_gives_up_after_two_tries(proxy):
    start, replicas = proxy
    for replica in replicas:
        replica.mode = "503"
    port = start()
    status, body = _request(port, "POST", "/generate")
    assert status == 503 and body["status"] == 503
    assert sum(r.count("POST") for r in replicas) == 2


def test_nginx_resends_a_get_after_a_failure(proxy):
    start, (crashing, serving) = proxy
    crashing.mode = "reset"
    port = start()
    answers = [_request(port, "GET", "/info") for _ in range(4)]
    assert answers == [(200, {"replica": "ember-2", "status": 200})] * 4
    assert crashing.count("GET") >= 1


def test_nginx_passes_a_post_on_when_a_replica_refuses_connections(proxy):
    """Nothing was sent to a replica that refused the connection: the other one gets the POST."""
    start, (_, serving) = proxy
    port = start([f"127.0.0.1:{_free_port()}", serving.address])
    answers = [_request(port, "POST", "/generate") for _ in range(4)]
    assert answers == [(200, {"replica": "ember-2", "status": 200})] * 4
    assert serving.count("POST") == 4


def test_nginx_streams_events_as_they_are_written(proxy):
    start, replicas = proxy
    port = start([replicas[0].address] * 2)  # both upstream entries: the one replica that waits
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", "/stream")
        response = conn.getresponse()
        first = response.readline()
        replicas[0].release.set()  # the replica finishes only now: the first event came through unbuffered
        rest = response.read()
    finally:
        conn.close()
    assert first == b"data: first\n" and b"data: last" in rest
    assert replicas[0].released_in_time is True


# --- Grafana ------------------------------------------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "ember-dashboard.json"
SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}


def _metric_names(text: str) -> set[str]:
    names = set()
    for name in re.findall(r"\b((?:tgi|ember)_[a-z_]+)\b", text):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


def _panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def _queries() -> list[tuple[str, str]]:
    """(a name for each panel's target, its expr with Grafana's variables as the live test substitutes them)."""
    out = []
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in SUBSTITUTIONS.items():
                expr = expr.replace(variable, value)
            out.append((f"Panel{panel['id']}{target['refId']}", expr))
    return out


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["definition"] == "label_values(tgi_request_count, instance)"
    panels = _panels()
    assert len(panels) >= 12
    for panel in panels:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert {t["datasource"]["uid"] for t in panel["targets"]} == {"${datasource}"}, panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


def test_dashboard_queries_use_known_metrics_and_variables():
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            assert _metric_names(expr) and _metric_names(expr) <= METRICS, expr
            assert set(re.findall(r"\$\{?\w+", expr)) <= set(SUBSTITUTIONS), expr
            selectors = re.findall(r"\b(?:tgi|ember)_[a-z_]+\{([^}]*)\}", expr)
            assert selectors and all('instance=~"$instance"' in s for s in selectors), expr


def _series(name: str, labels: dict[str, str], values: str) -> dict:
    text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def _healthy_traffic() -> list[dict]:
    """Two replicas that have served requests, as /metrics shows them (a `model` label on per-model series).
    No failures (tgi_request_failure has no series then) and no prefix-cache hits."""
    series = []
    for instance in ("ember-1:80", "ember-2:80"):
        base = {"job": "ember", "instance": instance}
        model = {**base, "model": "smollm2"}
        for name in HISTOGRAMS:
            for extra in (
                [{"method": "prefill"}, {"method": "decode"}] if name == "tgi_batch_inference_duration" else [{}]
            ):
                labels = {**model, **extra}
                for le, step in (("0.1", 1), ("1", 3), ("10", 4), ("+Inf", 4)):
                    series.append(_series(f"{name}_bucket", {**labels, "le": le}, f"0+{step}x60"))
                series.append(_series(f"{name}_sum", labels, "0+6x60"))
                series.append(_series(f"{name}_count", labels, "0+4x60"))
        series += [_series(name, model, "0+4x60") for name in ("tgi_request_count", "tgi_request_success")]
        series.append(_series("ember_prompt_tokens_total", {**model, "source": "computed"}, "0+100x60"))
        series.append(_series("ember_http_requests_total", {**base, "route": "/generate", "status": "200"}, "0+4x60"))
        series += [_series(name, model, "3x60") for name in GAUGES - {"ember_draining", "ember_models_loaded"}]
        series += [_series("ember_draining", base, "0x60"), _series("ember_models_loaded", base, "1x60")]
    return series


def test_dashboard_queries_return_data_on_healthy_traffic(tmp_path):
    """Each query, as an alert that fires when it returns nothing, over 15 minutes of made-up traffic."""
    promtool = _tool("promtool")
    queries = _queries()
    rules = [{"alert": name, "expr": f"absent({expr})"} for name, expr in queries]
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    test = {
        "rule_files": ["panels.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "15s",
                "input_series": _healthy_traffic(),
                "alert_rule_test": [{"eval_time": "10m", "alertname": name, "exp_alerts": []} for name, _ in queries],
            }
        ],
    }
    (tmp_path / "panels.test.yml").write_text(yaml.safe_dump(test))
    assert "SUCCESS" in _ok(promtool, "check", "rules", "panels.yml", cwd=tmp_path)
    assert "SUCCESS" in _ok(promtool, "test", "rules", "panels.test.yml", cwd=tmp_path)


# --- docs ---------------------------------------------------------------------------------------------------------


def test_deployment_doc_names_files_that_exist():
    doc = (ROOT / "docs" / "deployment.md").read_text()
    named = {t for t in re.findall(r"`((?:deploy|docs)/[\w./-]+|docker-compose\.yml|Dockerfile)`", doc)}
    assert len(named) >= 8
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"docs/deployment.md names what the repository does not have: {missing}"
    assert not re.search(r"(^|[\s`(])/(work|root|home|tmp)/", doc), "no paths of one machine"
