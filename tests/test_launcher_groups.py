"""Shard groups loaded on demand: the group manager with fake shards, its gRPC service, a real launcher.

The fake shard is a small Python process that serves the shard contract's
Health on its unix socket (after a delay, or exits instead, as its model
directory's `fake.json` says), so the manager's starting, failing, unloading
and watching run against real processes in seconds. The last test runs a real
`ember-launcher` on tiny models. Every wait polls with a deadline.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
from servers import Launcher, control_client, free_port, live_members, shard_healthy, wait_for

from ember import model_names
from ember.launcher.control import ControlServer
from ember.launcher.groups import (
    GroupInfo,
    GroupManager,
    InvalidName,
    NotFound,
    State,
    Target,
    Unavailable,
    Unservable,
    path_digest,
    registry_resolver,
    rss_bytes,
)
from ember.launcher.logs import LogSink
from ember.launcher.supervisor import ChildDied, ChildSpec, StartupFailed, Supervisor, shards_pending
from ember.proto import control_pb2 as cpb

FAKE_SHARD = """
import json, pathlib, sys, threading
socket_path, model_dir = sys.argv[1], pathlib.Path(sys.argv[2])
plan = json.loads((model_dir / "fake.json").read_text()) if (model_dir / "fake.json").exists() else {}
print("fake shard starting", flush=True)
threading.Event().wait(plan.get("delay", 0))
if "exit" in plan:
    print("fake shard gives up: no weights", flush=True)
    sys.exit(plan["exit"])
from concurrent import futures
import grpc
from ember.proto import generate_pb2, generate_pb2_grpc

class Health(generate_pb2_grpc.TextGenerationServiceServicer):
    def Health(self, request, context):
        return generate_pb2.HealthResponse()

server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(Health(), server)
server.add_insecure_port("unix://" + socket_path)
server.start()
print("fake shard serving", flush=True)
server.wait_for_termination()
"""
WEIGHTS = 4321
TIMEOUT = 30.0


def fake_model(root: Path, name: str, heads: int = 4, **plan) -> Path:
    """A model directory a fake shard serves: config.json, a weights file of WEIGHTS bytes, the fake's plan."""
    directory = root / name
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_attention_heads": heads, "num_key_value_heads": heads})
    )
    (directory / "model.safetensors").write_bytes(b"\0" * WEIGHTS)
    (directory / "fake.json").write_text(json.dumps(plan))
    return directory


def fake_spec(target: Target, rank: int, prefix: str, master_port: int) -> ChildSpec:
    socket = f"{prefix}-{rank}"
    argv = [sys.executable, "-u", "-c", FAKE_SHARD, socket, str(target.path)]
    return ChildSpec("shard", rank, argv, dict(os.environ), sockets=[socket])


def mapping_resolver(models: dict[str, Path]):
    """Names of the test's own choosing; the naming rule still applies."""

    def resolve(name: str) -> Target:
        try:
            model_names.parse(name)
        except model_names.ModelNameError as error:
            raise InvalidName(str(error)) from error
        if name not in models:
            raise NotFound(f"model {name!r} not found")
        return Target(key=path_digest(models[name]), path=models[name])

    return resolve


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class Rig:
    """A supervisor whose exits go through the manager, watched on a thread as the launcher's main thread does."""

    def __init__(self, tmp_path: Path, models: dict[str, Path], num_shard: int = 1, startup_timeout: float = TIMEOUT):
        self.out = io.StringIO()
        self.supervisor = Supervisor(LogSink(self.out))
        self.prefix = str(tmp_path / "e")
        self.manager = GroupManager(
            self.supervisor,
            mapping_resolver(models),
            fake_spec,
            prefix=self.prefix,
            num_shard=num_shard,
            startup_timeout=startup_timeout,
            grace_s=5.0,
        )
        self.supervisor.on_child_exit(self.manager.child_exited)
        self.raised: Future[BaseException] = Future()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        try:
            self.supervisor.watch()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.raised.set_result(exc)

    def load(self, name: str, timeout: float = TIMEOUT) -> GroupInfo:
        return self.manager.load(name).result(timeout)

    def sockets(self) -> list[str]:
        return sorted(p.name for p in Path(self.prefix).parent.glob(Path(self.prefix).name + "-*"))

    def close(self) -> None:
        self.manager.close()
        if not self.raised.done():
            self.supervisor._on_signal(signal.SIGTERM, None)  # as a SIGTERM would: watch() returns
        self._watcher.join(5)
        self.supervisor.stop(graceful=False, grace_s=1.0)


@pytest.fixture
def rig(tmp_path):
    made: list[Rig] = []

    def make(models: dict[str, Path], **kw) -> Rig:
        made.append(Rig(tmp_path, models, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def drain_until(events, predicate, timeout: float = TIMEOUT) -> list[GroupInfo]:
    """Events from a watch queue up to and including the first that satisfies `predicate`."""
    seen: list[GroupInfo] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = events.get(timeout=0.1)
        except Exception:  # noqa: BLE001 - queue.Empty
            continue
        seen.append(info)
        if info is not None and predicate(info):
            return seen
    raise TimeoutError(f"no matching event; saw {seen}")


def test_load_starts_a_group_whose_every_rank_answers_health(tmp_path, rig):
    r = rig({"tiny-a": fake_model(tmp_path, "a")}, num_shard=2)
    info = r.load("tiny-a")
    assert info.state is State.READY and info.name == "tiny-a" and not info.default
    assert info.group == path_digest(tmp_path / "a") and info.model_dir == str(tmp_path / "a")
    assert info.master_socket == f"{r.prefix}-g1-0" and r.sockets() == ["e-g1-0", "e-g1-1"]
    assert len(info.pids) == 2 and info.rss_bytes > 0 and info.weights_bytes == WEIGHTS and info.load_seconds > 0
    assert not shards_pending(r.supervisor.children)
    text = r.out.getvalue()
    assert "[launcher] started g1 shard 1 (pid " in text and "[g1 shard 0] fake shard serving" in text
    assert "[launcher] group tiny-a ready in " in text
    assert [g.group for g in r.manager.list()] == [info.group]
    again = r.manager.load("tiny-a")
    assert again.done() and again.result().pids == info.pids  # a ready group answers at once


def test_concurrent_loads_of_one_group_share_one_start(tmp_path, rig):
    model = fake_model(tmp_path, "a", delay=0.5)
    r = rig({"tiny-a": model, "alias": model})
    first, second, other_name = (r.manager.load(n) for n in ("tiny-a", "tiny-a", "alias"))
    assert first is second  # joined the load in flight
    infos = [f.result(TIMEOUT) for f in (first, second, other_name)]
    assert len({i.pids for i in infos}) == 1 and len({i.group for i in infos}) == 1
    assert r.out.getvalue().count("[launcher] started ") == 1


def test_rank_death_fails_only_its_group_which_a_new_load_restarts(tmp_path, rig):
    r = rig({"tiny-a": fake_model(tmp_path, "a")}, num_shard=2)
    info = r.load("tiny-a")
    with r.manager.watch() as events:
        assert events.get(timeout=1).state is State.READY  # one event per current group first
        os.kill(info.pids[0], signal.SIGKILL)
        seen = drain_until(events, lambda i: i.state is State.FAILED)
    assert [i.state for i in seen] == [State.STOPPING, State.FAILED]
    failed = seen[-1]
    assert failed.reason.startswith("shard rank 0 of group tiny-a died (killed by signal SIGKILL)\n")
    assert "fake shard serving" in failed.reason  # its last lines
    assert failed.pids == () and all(process_gone(pid) for pid in info.pids)
    assert r.sockets() == [] and not r.raised.done()  # the launcher goes on
    assert [g.state for g in r.manager.list()] == [State.FAILED]
    again = r.load("tiny-a")
    assert again.state is State.READY and again.master_socket == f"{r.prefix}-g2-0"
    assert not set(again.pids) & set(info.pids)


def test_unload_stops_reaps_and_removes_sockets(tmp_path, rig):
    r = rig({"tiny-a": fake_model(tmp_path, "a")})
    info = r.load("tiny-a")
    with r.manager.watch() as events:
        events.get(timeout=1)
        assert r.manager.unload(info.group) is True
        seen = drain_until(events, lambda i: i.state is State.STOPPED, timeout=1)
    assert [i.state for i in seen] == [State.STOPPING, State.STOPPED]
    assert r.sockets() == [] and all(process_gone(pid) for pid in info.pids)
    assert r.manager.list() == [] and r.supervisor.children == []
    assert r.manager.unload(info.group) is False and not r.raised.done()


def test_unload_while_loading_cancels_the_load(tmp_path, rig):
    r = rig({"slow": fake_model(tmp_path, "a", delay=60)})
    future = r.manager.load("slow")
    with r.manager.watch() as events:
        loading = drain_until(events, lambda i: i.state is State.LOADING and len(i.pids) == 1)[-1]
    assert r.manager.unload(loading.group) is True
    with pytest.raises(Unavailable, match="unloaded while starting"):
        future.result(TIMEOUT)
    assert r.sockets() == [] and process_gone(loading.pids[0]) and r.manager.list() == []


def test_default_group_death_is_fatal_until_it_is_unloaded(tmp_path, rig):
    model = fake_model(tmp_path, "default")
    r = rig({"default-model": model})
    target = Target(key=path_digest(model), path=model)
    child = r.supervisor.start(dataclasses.replace(fake_spec(target, 0, r.prefix, 0), group=target.key))
    wait_for(lambda: not shards_pending([child]), TIMEOUT, "default shard")
    info = r.manager.adopt_default("default-model", target, [child], 29500)
    assert info.default and info.master_socket == f"{r.prefix}-0"

    assert r.manager.unload(info.group) is True  # Jan's stop on the default model
    assert r.sockets() == [] and process_gone(child.pid) and not r.raised.done()
    back = r.load("default-model")
    assert back.default and back.master_socket == f"{r.prefix}-0" and back.group == info.group
    os.kill(back.pids[0], signal.SIGKILL)
    died = r.raised.result(TIMEOUT)
    assert isinstance(died, ChildDied) and died.child.pid == back.pids[0]


def test_the_routers_death_stays_fatal(tmp_path, rig):
    r = rig({})
    router = r.supervisor.start(ChildSpec("router", None, [sys.executable, "-c", "raise SystemExit(4)"]))
    died = r.raised.result(TIMEOUT)
    assert isinstance(died, ChildDied) and died.child is router


def test_stop_runs_between_once_the_router_is_stopped_and_before_the_shards():
    out = io.StringIO()
    supervisor = Supervisor(LogSink(out))
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    supervisor.start(ChildSpec("shard", 0, sleeper))
    supervisor.start(ChildSpec("router", None, sleeper))
    supervisor.stop(graceful=True, grace_s=5.0, between=lambda: supervisor.sink.launcher("control service stopped"))
    text = out.getvalue()
    assert text.index("router stopped") < text.index("control service stopped") < text.index("stopping shard 0")


def test_bad_names_and_unservable_models_fail_with_their_reason_and_leave_nothing(tmp_path, rig):
    models = {
        "odd-heads": fake_model(tmp_path, "odd", heads=3),
        "broken": fake_model(tmp_path, "broken", exit=3),
        "slow": fake_model(tmp_path, "slow", delay=60),
    }
    r = rig(models, num_shard=2, startup_timeout=1.0)
    with pytest.raises(InvalidName, match="must start with a letter or a digit"):
        r.load("-bad name")
    with pytest.raises(InvalidName, match="non-empty"):
        r.load("")
    with pytest.raises(NotFound, match="'nope' not found"):
        r.load("nope")
    with pytest.raises(Unservable, match="num_attention_heads=3 is not divisible by --num-shard 2"):
        r.load("odd-heads")
    assert r.manager.list() == [] and r.sockets() == [] and "started" not in r.out.getvalue()

    with pytest.raises(Unavailable, match="shard rank . of group broken died while starting \\(exit code 3\\)") as e:
        r.load("broken")
    assert "fake shard gives up: no weights" in str(e.value)  # the rank's last lines
    with pytest.raises(Unavailable, match="did not become ready within 1 s"):
        r.load("slow")
    assert {g.name: g.state for g in r.manager.list()} == {"broken": State.FAILED, "slow": State.FAILED}
    assert r.sockets() == [] and r.supervisor.children == [] and not r.raised.done()


def test_close_fails_loads_in_flight_ends_watches_and_refuses_new_children(tmp_path, rig):
    r = rig({"slow": fake_model(tmp_path, "a", delay=60)})
    future = r.manager.load("slow")
    with r.manager.watch() as events:
        drain_until(events, lambda i: len(i.pids) == 1)
        r.manager.close()
        assert events.get(timeout=1) is None  # the stream's end
    with pytest.raises(Unavailable, match="the launcher is stopping"):
        future.result(TIMEOUT)
    with pytest.raises(Unavailable, match="the launcher is stopping"):
        r.manager.load("slow").result(1)
    r.supervisor.stop(graceful=False, grace_s=1.0)
    with pytest.raises(StartupFailed, match="the launcher is stopping"):
        r.supervisor.start(fake_spec(Target("k", tmp_path), 0, r.prefix, 0))


def test_rss_of_processes_comes_from_proc():
    assert rss_bytes([os.getpid()]) > 10_000_000  # this interpreter, with pytest loaded
    assert rss_bytes([2**22 + 7]) == 0  # no such process


# -- the gRPC service ------------------------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path, rig):
    """A group manager behind a real ControlServer on a unix socket, and a client stub."""
    r = rig({"tiny-a": fake_model(tmp_path, "a", delay=1.5), "tiny-b": fake_model(tmp_path, "b")})
    server = ControlServer(str(tmp_path / "control"), r.manager)
    server.start()
    with control_client(server.path) as stub:
        yield r, stub
    server.stop()
    assert not os.path.exists(server.path)


def test_an_abandoned_load_still_finishes_and_the_next_load_is_instant(served):
    r, stub = served
    with pytest.raises(grpc.RpcError) as abandoned:
        stub.Load(cpb.LoadRequest(name="tiny-a"), timeout=0.3)
    assert abandoned.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    events = stub.Watch(cpb.WatchRequest(), timeout=TIMEOUT)
    ready = next(e.group for e in events if e.group.state == cpb.GROUP_STATE_READY)
    events.cancel()
    started = time.monotonic()
    again = stub.Load(cpb.LoadRequest(name="tiny-a"), timeout=TIMEOUT)
    assert time.monotonic() - started < 1.0
    assert (again.group, list(again.pids), again.state) == (ready.group, list(ready.pids), cpb.GROUP_STATE_READY)
    assert r.out.getvalue().count("[launcher] started ") == 1
    listed = stub.List(cpb.ListRequest(), timeout=5).groups
    assert [(g.name, g.weights_bytes, g.master_socket) for g in listed] == [("tiny-a", WEIGHTS, f"{r.prefix}-g1-0")]


def test_service_errors_carry_status_codes_and_messages(served):
    r, stub = served
    for name, code, words in (
        ("-bad name", grpc.StatusCode.INVALID_ARGUMENT, "must start with a letter"),
        ("nope", grpc.StatusCode.NOT_FOUND, "'nope' not found"),
    ):
        with pytest.raises(grpc.RpcError) as failed:
            stub.Load(cpb.LoadRequest(name=name), timeout=5)
        assert failed.value.code() == code and words in failed.value.details()
    with pytest.raises(grpc.RpcError) as failed:
        stub.Unload(cpb.UnloadRequest(), timeout=5)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    b = stub.Load(cpb.LoadRequest(name="tiny-b"), timeout=TIMEOUT)
    assert shard_healthy(b.master_socket) and b.rss_bytes > 0
    assert stub.Unload(cpb.UnloadRequest(group=b.group), timeout=TIMEOUT).loaded is True
    assert stub.Unload(cpb.UnloadRequest(group=b.group), timeout=TIMEOUT).loaded is False
    assert not os.path.exists(b.master_socket) and stub.List(cpb.ListRequest(), timeout=5).groups == []


# -- a real launcher on tiny models ----------------------------------------------------------------------------------


def test_launcher_loads_fails_unloads_and_stops_groups(tmp_path, tiny_llama_dir, tiny_model_factory):
    other = tiny_model_factory("llama", seed=1)
    prefix = tmp_path / "ember"
    launcher = Launcher(
        *["--model-id", str(tiny_llama_dir), "--shard-uds-path", str(prefix), "--master-port", str(free_port())],
        *["--port", str(free_port()), "--hostname", "127.0.0.1", "--kv-cache-bytes", "4MiB"],
        *["--max-total-tokens", "256", "--max-input-tokens", "128", "--max-batch-prefill-tokens", "256"],
    )
    try:
        launcher.wait_for_line("[launcher] serving ")
        control = f"{prefix}-control"
        with control_client(control) as stub:
            (default,) = stub.List(cpb.ListRequest(), timeout=5).groups
            assert default.default and default.master_socket == f"{prefix}-0"
            assert default.load_seconds > 0 and default.weights_bytes > 0 and default.rss_bytes > 0

            for name, code in (("-bad", grpc.StatusCode.INVALID_ARGUMENT), ("nope", grpc.StatusCode.NOT_FOUND)):
                with pytest.raises(grpc.RpcError) as failed:
                    stub.Load(cpb.LoadRequest(name=name), timeout=10)
                assert failed.value.code() == code and failed.value.details()
            assert not list(tmp_path.glob("ember-g*"))

            loads = [stub.Load.future(cpb.LoadRequest(name=str(other)), timeout=120) for _ in range(2)]
            first, second = (f.result() for f in loads)
            assert first.state == cpb.GROUP_STATE_READY and list(first.pids) == list(second.pids)
            assert first.master_socket == f"{prefix}-g1-0" and shard_healthy(first.master_socket)

            events = stub.Watch(cpb.WatchRequest(), timeout=120)
            os.kill(first.pids[0], signal.SIGKILL)
            failed = next(e.group for e in events if e.group.state == cpb.GROUP_STATE_FAILED)
            events.cancel()
            assert "killed by signal SIGKILL" in failed.reason and failed.group == first.group
            assert launcher.proc.poll() is None and shard_healthy(f"{prefix}-0")
            again = stub.Load(cpb.LoadRequest(name=str(other)), timeout=120)
            assert again.master_socket == f"{prefix}-g2-0" and shard_healthy(again.master_socket)

            assert stub.Unload(cpb.UnloadRequest(group=again.group), timeout=60).loaded
            assert not os.path.exists(again.master_socket) and not live_members(set(again.pids))

            assert stub.Unload(cpb.UnloadRequest(group=default.group), timeout=60).loaded
            assert not os.path.exists(f"{prefix}-0") and launcher.proc.poll() is None
            back = stub.Load(cpb.LoadRequest(name=str(tiny_llama_dir)), timeout=120)
            assert back.default and back.master_socket == f"{prefix}-0" and shard_healthy(back.master_socket)
            assert launcher.proc.poll() is None

        launcher.proc.send_signal(signal.SIGTERM)
        assert launcher.wait_exit(60) == 0
        pgids = launcher.child_pids()
        wait_for(lambda: not live_members(pgids), 10, "every child's group gone")
        assert not list(tmp_path.glob("ember-*")), "a socket was left behind"
    finally:
        launcher.kill()


def test_registry_resolver_takes_local_paths_and_checks_names(tmp_path, tiny_llama_dir):
    import argparse

    resolve = registry_resolver(argparse.Namespace(cache_dir=str(tmp_path / "cache")), LogSink(io.StringIO()))
    target = resolve(str(tiny_llama_dir))
    assert target.path == tiny_llama_dir.resolve() and target.key == path_digest(tiny_llama_dir)
    with pytest.raises(NotFound, match="does not exist"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(InvalidName):
        resolve("a:b:c")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Unservable, match="no config.json"):
        resolve(str(empty))
