"""Supervision and log pumping with real (small Python) child processes."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
import time

import pytest

from ember.launcher.logs import LogSink
from ember.launcher.supervisor import (
    ChildDied,
    ChildSpec,
    Interrupted,
    StartupFailed,
    Supervisor,
    http_health,
    probe_host,
    shard_health,
    socket_listening,
)


def poll(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(what)


def process_gone(pid: int) -> bool:
    """Dead or a zombie (nobody may reap it inside a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def py(role: str, rank: int | None, code: str, **kw) -> ChildSpec:
    return ChildSpec(role, rank, [sys.executable, "-u", "-c", code], dict(os.environ), **kw)


@pytest.fixture
def sup():
    out = io.StringIO()
    supervisor = Supervisor(LogSink(out))
    supervisor.out = out
    yield supervisor
    supervisor.stop(graceful=False, grace_s=1.0)


def test_text_lines_are_prefixed_with_role_and_rank(sup):
    child = sup.start(py("shard", 1, "print('hello'); print('world')"))
    with pytest.raises(ChildDied) as died:
        sup.watch()
    assert died.value.child is child
    child.output.join(5)
    text = sup.out.getvalue()
    assert "[shard 1] hello\n[shard 1] world\n" in text
    assert child.output.last_lines() == ["hello", "world"]
    assert child.exit_description() == "exit code 0"


def test_json_mode_tags_child_records_and_wraps_plain_lines():
    out = io.StringIO()
    sink = LogSink(out, json_output=True)
    sink.child_line("router", None, json.dumps({"message": "up", "level": "INFO", "role": "router-x"}))
    sink.child_line("shard", 2, "a plain warning")
    sink.launcher("hi", child="shard 0")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records[0]["message"] == "up" and records[0]["role"] == "router" and records[0]["rank"] is None
    assert records[1]["message"] == "a plain warning" and (records[1]["role"], records[1]["rank"]) == ("shard", 2)
    assert records[2]["role"] == "launcher" and records[2]["child"] == "shard 0"


def test_ring_buffer_keeps_only_the_last_lines():
    out = io.StringIO()
    supervisor = Supervisor(LogSink(out), keep_lines=5)
    child = supervisor.start(py("shard", 0, "import sys\nfor i in range(100): print(i)\nsys.exit(3)"))
    with pytest.raises(ChildDied):
        supervisor.watch()
    child.output.join(5)
    assert child.output.last_lines() == ["95", "96", "97", "98", "99"]
    assert child.exit_description() == "exit code 3"
    assert "[shard 0] 0\n" in out.getvalue()


def test_death_during_startup_raises_child_died(sup):
    sup.start(py("shard", 0, "import time; time.sleep(60)"))
    dying = sup.start(py("shard", 1, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    with pytest.raises(ChildDied) as died:
        sup.wait_ready(lambda: {c: "not yet" for c in sup.children}, timeout=60)
    assert died.value.child is dying
    assert dying.exit_description() == "killed by signal SIGKILL"


def test_startup_deadline_names_the_child_that_is_not_ready(sup):
    sup.start(py("shard", 0, "import time; time.sleep(60)"))
    slow = sup.start(py("shard", 1, "import time; time.sleep(60)"))
    with pytest.raises(StartupFailed, match=r"^shard 1 did not become ready within 0.3 s \(no socket\)$"):
        sup.wait_ready(lambda: {slow: "no socket"}, timeout=0.3)


def test_signal_interrupts_watch(sup):
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        sup.install_signal_handlers()
        sup.start(py("router", None, "import time; time.sleep(60)"))
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Interrupted) as interrupted:
            sup.watch()
        assert interrupted.value.signum == signal.SIGTERM
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print("grandchild", grandchild.pid, flush=True)
time.sleep(60)
"""


def test_stop_escalates_to_sigkill_and_kills_the_whole_group(sup, tmp_path):
    socket = tmp_path / "sock-0"
    socket.write_text("")
    child = sup.start(py("shard", 0, STUBBORN, sockets=[str(socket)]))
    line = poll(lambda: next((line for line in child.output.last_lines() if line.startswith("grandchild")), None))
    grandchild = int(line.split()[1])
    sup.stop(graceful=True, grace_s=0.5)
    assert child.exit_description() == "killed by signal SIGKILL"
    poll(lambda: process_gone(grandchild), what="grandchild killed with its group")
    assert not socket.exists()


def test_graceful_stop_stops_router_before_shards(sup):
    order = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('bye', flush=True), sys.exit(0)))\n"
        "print('up', flush=True)\ntime.sleep(60)"
    )
    shard = sup.start(py("shard", 0, order))
    router = sup.start(py("router", None, order))
    poll(lambda: "up" in shard.output.last_lines() and "up" in router.output.last_lines())
    sup.stop(graceful=True, grace_s=10)
    text = sup.out.getvalue()
    assert text.index("[router] bye") < text.index("stopping shard 0")
    assert router.exit_description() == shard.exit_description() == "exit code 0"


def test_probes_fail_when_nothing_listens(tmp_path):
    stale = tmp_path / "stale-0"
    stale.write_text("")
    missing = str(tmp_path / "missing-1")
    assert shard_health([str(stale), missing], timeout=2) == [str(stale), missing]
    assert not socket_listening(str(stale)) and not socket_listening(missing)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "live-0"))
        server.listen()
        assert socket_listening(str(tmp_path / "live-0"))
    assert not http_health("http://127.0.0.1:9/health", timeout=0.5)
    assert probe_host("0.0.0.0") == "127.0.0.1" and probe_host("::") == "[::1]"


def test_second_signal_cuts_the_grace_period_short(sup):
    child = sup.start(
        py(
            "router",
            None,
            "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('up', flush=True)\ntime.sleep(60)",
        )
    )
    poll(lambda: "up" in child.output.last_lines())
    sup._on_signal(signal.SIGINT, None)  # as the handler does when a second Ctrl-C arrives
    sup.stop(graceful=True, grace_s=600)
    assert child.exit_description() == "killed by signal SIGKILL"
    assert "second signal" in sup.out.getvalue()
