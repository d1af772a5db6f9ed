"""`ember-launcher` end to end: real shard and router processes on the tiny model.

Each test starts the launcher as users do and watches its output; every wait
polls with a deadline. Afterwards no process of any child's group may be alive
and no shard socket may remain.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
START_TIMEOUT = 180.0
needs_router = pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "router" / "cli.py").exists(),
                                  reason="the router CLI is not written yet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout}s")


def live_members(pgids: set[int]) -> list[int]:
    """Pids (not zombies) whose process group is one of `pgids`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp in pgids and state != "Z":
            found.append(int(entry.name))
    return found


class Launcher:
    """A running `ember-launcher` whose output lines are collected by a reader thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [str(BIN / "ember-launcher"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def output(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_for_line(self, needle: str, timeout: float = START_TIMEOUT) -> str:
        def seen():
            if self.proc.poll() is not None:
                self._reader.join(5)
                found = next((l for l in self.output() if needle in l), None)
                if found is None:
                    raise AssertionError(f"launcher exited ({self.proc.returncode}) before {needle!r}:\n"
                                         + "\n".join(self.output()[-40:]))
                return found
            return next((l for l in self.output() if needle in l), None)

        return poll(seen, timeout, f"launcher line {needle!r}")

    def wait_exit(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def child_pids(self) -> set[int]:
        """Pids of the children, from the launcher's `started ... (pid N)` lines (text or JSON)."""
        pids = set()
        for line in self.output():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("role") == "launcher" and "pid" in record:
                    pids.add(int(record["pid"]))
            elif line.startswith("[launcher] started "):
                pids.add(int(line.rsplit("pid ", 1)[1].rstrip(")")))
        return pids

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in live_members(self.child_pids()):
            os.kill(pid, signal.SIGKILL)


def assert_cleaned_up(launcher: Launcher, prefix: Path) -> None:
    pgids = launcher.child_pids()
    assert pgids, "the launcher reported no children"
    poll(lambda: not live_members(pgids), 10, "every child's group gone")
    assert not list(prefix.parent.glob(prefix.name + "-*")), "a shard socket was left behind"


@pytest.fixture
def uds_prefix(tmp_path) -> Path:
    return tmp_path / "ember"


def launcher_args(model_dir: Path, prefix: Path, port: int, *extra: str) -> list[str]:
    return ["--model-id", str(model_dir), "--shard-uds-path", str(prefix), "--port", str(port),
            "--hostname", "127.0.0.1", "--master-port", str(free_port()), "--max-concurrent-requests", "8",
            "--max-batch-prefill-tokens", "512", "--max-total-tokens", "512", "--max-input-tokens", "256",
            "--kv-cache-bytes", "4MiB", *extra]


def test_shard_that_fails_to_load_is_named_with_its_last_lines(tmp_path, uds_prefix):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    launcher = Launcher(*launcher_args(broken, uds_prefix, free_port()))
    try:
        assert launcher.wait_exit(START_TIMEOUT) == 1
        out = "\n".join(launcher.output())
        assert "shard 0 died (exit code" in out
        assert "  shard 0 | " in out  # its last lines, e.g. the traceback
        assert "started router" not in out
        assert_cleaned_up(launcher, uds_prefix)
    finally:
        launcher.kill()


def test_shard_startup_deadline_names_the_rank(tiny_llama_dir, uds_prefix):
    launcher = Launcher(*launcher_args(tiny_llama_dir, uds_prefix, free_port(), "--shard-startup-timeout", "0.1"))
    try:
        assert launcher.wait_exit(60) == 1
        out = "\n".join(launcher.output())
        assert "shard 0 did not become ready within 0.1 s" in out
        assert_cleaned_up(launcher, uds_prefix)
    finally:
        launcher.kill()


def stream_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield json.loads(line[len("data:"):])


def metric(client: httpx.Client, base: str, name: str) -> float:
    text = client.get(f"{base}/metrics").text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@needs_router
def test_serves_with_prefixed_logs_and_drains_in_flight_requests_on_sigterm(tiny_llama_dir, uds_prefix):
    port = free_port()
    launcher = Launcher(*launcher_args(tiny_llama_dir, uds_prefix, port))
    try:
        launcher.wait_for_line("[launcher] serving ")
        out = launcher.output()
        assert any(l.startswith("[shard 0] ") for l in out)
        assert any(l.startswith("[router] ") for l in out)
        base = f"http://127.0.0.1:{port}"
        params = {"ignore_eos": True, "details": True}
        plain: dict = {}

        def post_generate() -> None:
            body = {"inputs": "Hello world", "parameters": {**params, "max_new_tokens": 400}}
            response = httpx.post(f"{base}/generate", json=body, timeout=120)
            plain.update(status=response.status_code, body=response.json())

        poster = threading.Thread(target=post_generate)
        tokens_after_sigterm = 0
        with httpx.Client(timeout=120) as client:
            poster.start()
            poll(lambda: metric(client, base, "tgi_batch_current_size") >= 1, 60, "/generate running")
            body = {"inputs": "The capital of France is", "parameters": {**params, "max_new_tokens": 200}}
            with client.stream("POST", f"{base}/generate_stream", json=body) as response:
                assert response.status_code == 200
                events = stream_events(response)
                last = next(events)
                launcher.proc.send_signal(signal.SIGTERM)  # both requests are in flight now
                for last in events:
                    tokens_after_sigterm += 1
        poster.join(120)
        assert last["details"]["generated_tokens"] == 200 and last["details"]["finish_reason"] == "length"
        assert tokens_after_sigterm == 199
        assert plain["status"] == 200
        assert plain["body"]["details"]["generated_tokens"] == 400
        assert launcher.wait_exit(60) == 0
        out = "\n".join(launcher.output())
        assert out.index("stopping router") < out.index("stopping shard 0")
        assert_cleaned_up(launcher, uds_prefix)
    finally:
        launcher.kill()


@needs_router
def test_sigkill_on_a_shard_stops_everything_with_json_logs(tiny_llama_dir, uds_prefix):
    launcher = Launcher(*launcher_args(tiny_llama_dir, uds_prefix, free_port(), "--json-output", "--num-shard", "2"))
    try:
        launcher.wait_for_line('"serving ')
        records = [json.loads(l) for l in launcher.output()]  # every line is a JSON object
        assert {r["rank"] for r in records if r["role"] == "shard"} == {0, 1}
        assert any(r["role"] == "router" and r["rank"] is None for r in records)
        shard_pid = next(r["pid"] for r in records if r.get("child") == "shard 1" and "pid" in r)
        os.kill(shard_pid, signal.SIGKILL)
        assert launcher.wait_exit(30) != 0
        records = [json.loads(l) for l in launcher.output()]
        death = next(r for r in records if r["role"] == "launcher" and r["level"] == "ERROR")
        assert death["child"] == "shard 1" and death["signal"] == signal.SIGKILL
        assert "SIGKILL" in death["message"]
        assert death["last_lines"], "the crash report carries the shard's last lines"
        assert_cleaned_up(launcher, uds_prefix)
    finally:
        launcher.kill()
