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
import sys
import threading
from pathlib import Path

import httpx
import pytest
from servers import Launcher, free_port, live_members, wait_for

from ember.router.metrics import without_model

BIN = Path(sys.executable).parent
START_TIMEOUT = 180.0


def assert_cleaned_up(launcher: Launcher, prefix: Path) -> None:
    pgids = launcher.child_pids()
    assert pgids, "the launcher reported no children"
    wait_for(lambda: not live_members(pgids), 10, "every child's group gone")
    assert not list(prefix.parent.glob(prefix.name + "-*")), "a shard socket was left behind"


@pytest.fixture
def uds_prefix(tmp_path) -> Path:
    return tmp_path / "ember"


def launcher_args(model_dir: Path, prefix: Path, port: int, *extra: str) -> list[str]:
    return [
        "--model-id",
        str(model_dir),
        "--shard-uds-path",
        str(prefix),
        "--port",
        str(port),
        "--hostname",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "--max-concurrent-requests",
        "8",
        "--max-batch-prefill-tokens",
        "512",
        "--max-total-tokens",
        "512",
        "--max-input-tokens",
        "256",
        "--kv-cache-bytes",
        "4MiB",
        *extra,
    ]


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
            yield json.loads(line[len("data:") :])


def metric(client: httpx.Client, base: str, name: str) -> float:
    text = without_model(client.get(f"{base}/metrics").text)
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_serves_with_prefixed_logs_and_drains_in_flight_requests_on_sigterm(tiny_llama_dir, uds_prefix):
    port = free_port()
    launcher = Launcher(*launcher_args(tiny_llama_dir, uds_prefix, port))
    try:
        launcher.wait_for_line("[launcher] serving ")
        out = launcher.output()
        assert any(line.startswith("[shard 0] ") for line in out)
        assert any(line.startswith("[router] ") for line in out)
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
            wait_for(lambda: metric(client, base, "tgi_batch_current_size") >= 1, 60, "/generate running")
            body = {"inputs": "The capital of France is", "parameters": {**params, "max_new_tokens": 200}}
            with client.stream("POST", f"{base}/generate_stream", json=body) as response:
                assert response.status_code == 200
                events = stream_events(response)
                last = next(events)
                launcher.proc.send_signal(signal.SIGTERM)  # both requests are in flight now
                for last in events:  # noqa: B007 (the last event is read after the loop)
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


def test_sigkill_on_a_shard_stops_everything_with_json_logs(tiny_llama_dir, uds_prefix):
    launcher = Launcher(*launcher_args(tiny_llama_dir, uds_prefix, free_port(), "--json-output", "--num-shard", "2"))
    try:
        launcher.wait_for_line('"serving ')
        records = [json.loads(line) for line in launcher.output()]  # every line is a JSON object
        assert {r["rank"] for r in records if r["role"] == "shard"} == {0, 1}
        assert any(r["role"] == "router" and r["rank"] is None for r in records)
        shard_pid = next(r["pid"] for r in records if r.get("child") == "shard 1" and "pid" in r)
        os.kill(shard_pid, signal.SIGKILL)
        assert launcher.wait_exit(30) != 0
        records = [json.loads(line) for line in launcher.output()]
        death = next(r for r in records if r["role"] == "launcher" and r["level"] == "ERROR")
        assert death["child"] == "shard 1" and death["signal"] == signal.SIGKILL
        assert "SIGKILL" in death["message"]
        assert death["last_lines"], "the crash report carries the shard's last lines"
        assert_cleaned_up(launcher, uds_prefix)
    finally:
        launcher.kill()


def test_children_die_with_a_sigkilled_launcher(tiny_llama_dir, uds_prefix):
    """Nothing can stop children when their launcher is killed outright: each watches it and exits."""
    port = free_port()
    launcher = Launcher(*launcher_args(tiny_llama_dir, uds_prefix, port))
    try:
        launcher.wait_for_line("[launcher] serving ")
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        pgids = launcher.child_pids()
        assert len(pgids) == 2  # the shard and the router, each leading its own group
        launcher.proc.kill()
        launcher.proc.wait(10)
        wait_for(lambda: not live_members(pgids), 15, "the orphaned shard and router gone")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        launcher.kill()


def test_a_child_whose_launcher_is_already_gone_exits_at_once(tmp_path):
    """The pid named in EMBER_PARENT_PID is not this process's parent (it died, its pid reused): exit 1."""
    import subprocess

    env = {**os.environ, "EMBER_PARENT_PID": str(os.getpid())}  # alive, but the child's parent is the shell
    code = "from ember import lifeline; lifeline.die_with_parent('probe'); import time; time.sleep(30)"
    child = subprocess.Popen(
        ["/bin/sh", "-c", f'"{sys.executable}" -c "{code}"; exit $?'], env=env, stderr=subprocess.PIPE, text=True
    )
    _, err = child.communicate(timeout=20)
    assert child.returncode == 1 and "is gone" in err
