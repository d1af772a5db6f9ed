"""Shard groups: one model's ranks, loaded on demand, watched, and stopped (the mechanism behind ModelControl).

The router decides which models to serve; the launcher, the one process
supervisor, does the spawning and reaping. A group is keyed by the weights it
serves (`Target.key`), so two names for one set of weights share one group.

* The default model's group is started by `ember.launcher.main` at launch, as
  before, and handed over with `adopt_default`. While it is loaded, a death of
  one of its ranks is fatal (the launcher stops everything, exit 1); once it was
  unloaded, its absence is not an error, and a Load of the default model id
  starts it again on its original sockets.
* Any other group is started by `load` in a worker thread of its own, so a
  client that gives up waiting does not stop the load: the next Load finds the
  group ready. Its ranks listen on `{prefix}-g{n}-{rank}` and meet on a free
  torch.distributed port. A death of one of its ranks stops that group only:
  the others are killed and reaped, its sockets removed, and it turns FAILED.
* Every state change (LOADING, READY, STOPPING, STOPPED, FAILED) is pushed to
  every watcher's queue; a new watcher first gets one event per current group.

Errors carry the gRPC status code name the control service answers with
(`GroupError.code`), so this module needs no gRPC.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import itertools
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.launcher.logs import LineWriter, LogSink
from ember.launcher.supervisor import (
    FAILURE_GRACE_S,
    POLL_S,
    Child,
    ChildSpec,
    StartupFailed,
    Supervisor,
    report_death,
    shards_pending,
    socket_listening,
)
from ember.sharding import sharding_problem

UNLOAD_GRACE_S = 10.0
"""The most an unloaded group's ranks get to exit on SIGTERM: they serve nothing the router still needs."""
KEEP_FAILED = 16
"""Failed groups List keeps showing (the most recent ones), so the router can tell why a model is gone."""


class State(enum.IntEnum):
    """A group's state; the numbers are `ember.control.v1.GroupState`'s."""

    LOADING = 1
    READY = 2
    STOPPING = 3
    STOPPED = 4
    FAILED = 5


class GroupError(Exception):
    """A Load that failed; `code` names the gRPC status the control service answers with."""

    code = "UNAVAILABLE"


class NotFound(GroupError):
    code = "NOT_FOUND"


class InvalidName(GroupError):
    code = "INVALID_ARGUMENT"


class Unservable(GroupError):
    """The model exists but cannot be served (bad weights, cannot shard over --num-shard ranks)."""

    code = "FAILED_PRECONDITION"


class Unavailable(GroupError):
    """The group died or timed out while starting, was unloaded meanwhile, or the launcher is stopping."""

    code = "UNAVAILABLE"


@dataclass(frozen=True)
class Target:
    """What a name resolved to: the group key (weights digest, and the precision when the name has its own),
    the model directory, its revision, and `quantize` when the name runs its weights at its own precision."""

    key: str
    path: Path
    sha: str = ""
    quantize: str | None = None


Resolver = Callable[[str], Target]
"""Turns a model name into a `Target`; raises NotFound, InvalidName or Unservable (other errors: Unservable)."""

SpecFactory = Callable[[Target, int, str, int], ChildSpec]
"""`(target, rank, socket prefix, master port) -> ChildSpec` of one `ember-shard serve` rank."""


@dataclass(frozen=True)
class GroupInfo:
    """A snapshot of one group, field for field the control service's `Group` message."""

    group: str
    name: str
    state: State
    master_socket: str
    model_dir: str
    model_sha: str
    weights_bytes: int
    rss_bytes: int
    pids: tuple[int, ...]
    default: bool
    load_seconds: float
    reason: str


class _Group:
    """One start of a group (a restart is a new `_Group`); guarded by the manager's lock."""

    def __init__(self, name: str, target: Target, prefix: str, master_port: int, default: bool, tag: str) -> None:
        self.name = name
        self.target = target
        self.prefix = prefix
        self.master_port = master_port
        self.default = default
        self.tag = tag
        self.state = State.LOADING
        self.children: list[Child] = []
        self.started = time.monotonic()
        self.load_seconds = 0.0
        self.reason = ""
        self.cancelled = False  # unloaded while loading: the loader gives up
        self.settled = False  # the loader is done with it (ready or aborted)
        self.error: GroupError | None = None
        self.weights_bytes = weights_bytes(target.path)

    @property
    def key(self) -> str:
        return self.target.key

    @property
    def label(self) -> str:
        return f"group {self.name}"


@dataclass(frozen=True)
class _Default:
    """How to start the default group again after an Unload: its name, weights, sockets and port."""

    name: str
    target: Target
    prefix: str
    master_port: int


class GroupManager:
    """Loads, watches and stops shard groups; every public method may be called from any thread."""

    def __init__(
        self,
        supervisor: Supervisor,
        resolver: Resolver,
        spec_factory: SpecFactory,
        *,
        prefix: str,
        num_shard: int,
        startup_timeout: float,
        grace_s: float,
        probe: Callable[[list[Child]], dict[Child, str]] = shards_pending,
    ) -> None:
        self._supervisor = supervisor
        self._sink = supervisor.sink
        self._resolver = resolver
        self._spec_factory = spec_factory
        self._prefix = prefix
        self._num_shard = num_shard
        self._startup_timeout = startup_timeout
        self._grace_s = grace_s
        self._probe = probe
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._groups: dict[str, _Group] = {}
        self._names: dict[str, str] = {}  # name -> key of a READY group, so its Load answers without resolving
        self._jobs: dict[str, Future[GroupInfo]] = {}  # name -> the load in flight
        self._watchers: list[queue.SimpleQueue[GroupInfo | None]] = []
        self._counter = itertools.count(1)
        self._default: _Default | None = None
        self._closed = False

    # -- the default group

    def adopt_default(
        self, name: str, target: Target, children: list[Child], master_port: int, load_seconds: float = 0.0
    ) -> GroupInfo:
        """Take over the default group the launcher started itself (READY: its ranks answered Health)."""
        with self._lock:
            self._default = _Default(name, target, self._prefix, master_port)
            group = _Group(name, target, self._prefix, master_port, default=True, tag="")
            group.children = list(children)
            group.state = State.READY
            group.settled = True
            group.load_seconds = load_seconds
            self._groups[target.key] = group
            self._names[name] = target.key
            self._emit(group)
            return self._info(group)

    def child_exited(self, child: Child) -> bool:
        """The supervisor's exit handler: False (fatal) for the router and the loaded default group's ranks.

        Called on the launcher's main thread; the reaping of a failed group runs on a thread of its own.
        """
        key = child.spec.group
        if key is None:
            return False
        with self._lock:
            group = self._groups.get(key)
            if group is None or child not in group.children:
                return True  # a rank of a group already stopped and reaped
            if group.state is not State.READY:
                return True  # its loader or its unloader sees it go
            if group.default:
                return False
            group.state = State.STOPPING
            group.reason = f"shard rank {child.spec.rank} of {group.label} died ({child.exit_description()})"
            self._names_drop(group.key)
            self._emit(group)
        threading.Thread(target=self._fail, args=(group, child), name=f"fail-{group.tag}", daemon=True).start()
        return True

    def _fail(self, group: _Group, child: Child) -> None:
        """A READY group lost a rank: kill and reap the others, then report it FAILED with the last lines."""
        lines = report_death(self._sink, child, group.reason)
        self._supervisor.stop_children(group.children, min(self._grace_s, FAILURE_GRACE_S))
        with self._lock:
            group.reason = "\n".join([group.reason, *lines]) if lines else group.reason
            group.error = Unavailable(group.reason)
            self._finish(group, State.FAILED)

    # -- Load

    def load(self, name: str) -> Future[GroupInfo]:
        """Start loading `name` (or join the load in flight); the future's result is the READY group.

        The work runs on a thread of its own: a caller that stops waiting does not stop the load.
        """
        with self._lock:
            future: Future[GroupInfo] = Future()
            if self._closed:
                future.set_exception(Unavailable("the launcher is stopping"))
                return future
            ready = self._groups.get(self._names.get(name, ""))
            if ready is not None and ready.state is State.READY:
                future.set_result(self._info(ready))
                return future
            if name in self._jobs:
                return self._jobs[name]
            self._jobs[name] = future
        threading.Thread(target=self._run_load, args=(name, future), name=f"load-{name}", daemon=True).start()
        return future

    def _run_load(self, name: str, future: Future[GroupInfo]) -> None:
        try:
            info = self._load(name, time.monotonic())
        except Exception as error:  # noqa: BLE001 - even a bug must fail this Load, not hang its callers
            if not isinstance(error, GroupError):
                self._sink.launcher(f"loading {name!r} failed: {error!r}", "ERROR")
                error = Unavailable(f"loading {name!r} failed: {error}")
            self._job_done(name)
            future.set_exception(error)
            return
        self._job_done(name)
        future.set_result(info)

    def _job_done(self, name: str) -> None:
        with self._lock:
            self._jobs.pop(name, None)

    def _load(self, name: str, started: float) -> GroupInfo:
        target, default = self._target(name)
        waited: _Group | None = None
        with self._lock:
            while True:
                self._check_open()
                group = self._groups.get(target.key)
                if group is not None and group.state is State.READY:
                    self._names[name] = group.key
                    return self._info(group)
                if group is not None and group is waited and group.state is State.FAILED:
                    raise group.error or Unavailable(group.reason)  # the start this Load joined failed
                if group is not None and group.state in (State.LOADING, State.STOPPING):
                    waited = group if group.state is State.LOADING else waited
                    self._changed.wait(POLL_S)
                    continue
                break
            problem = sharding_problem_of(target.path, self._num_shard)
            if problem:
                raise Unservable(f"cannot shard {name!r} over {self._num_shard} rank(s): {problem}")
            group = self._new_group(name, target, default, started)
            self._groups[target.key] = group
            self._emit(group)
        return self._start(group)

    def _target(self, name: str) -> tuple[Target, bool]:
        """The weights `name` means, and whether they are the default model's."""
        if not name.strip():
            raise InvalidName("a model name must be a non-empty string")
        default = self._default
        if default is not None and name == default.name:
            return default.target, True
        self._sink.launcher(f"resolving model {name!r}")
        try:
            target = self._resolver(name)
        except GroupError:
            raise
        except Exception as error:  # noqa: BLE001 - the resolver's own reasons (bad weights, a failed fetch)
            raise Unservable(f"cannot resolve model {name!r}: {error}") from error
        self._sink.launcher(f"model {name!r} is at {target.path}", path=str(target.path))
        return target, default is not None and target.key == default.target.key

    def _new_group(self, name: str, target: Target, default: bool, started: float) -> _Group:
        """A LOADING group: the default's original sockets and port, else the next free `{prefix}-g{n}`."""
        if default and self._default is not None:
            group = _Group(name, target, self._default.prefix, self._default.master_port, True, "")
        else:
            tag, prefix = self._fresh_prefix()
            group = _Group(name, target, prefix, free_port(), False, tag)
        group.started = started
        self._drop_old_failed()
        return group

    def _fresh_prefix(self) -> tuple[str, str]:
        """`g{n}` and its socket prefix, skipping prefixes another server still listens on."""
        while True:
            tag = f"g{next(self._counter)}"
            prefix = f"{self._prefix}-{tag}"
            sockets = [f"{prefix}-{rank}" for rank in range(self._num_shard)]
            if any(socket_listening(path) for path in sockets):
                continue
            for path in sockets:
                Path(path).unlink(missing_ok=True)  # left behind by a launcher that crashed
            return tag, prefix

    def _start(self, group: _Group) -> GroupInfo:
        """Spawn the ranks and wait until all answer Health; on any error reap them and re-raise."""
        self._sink.launcher(f"loading {group.label} on {group.prefix}-* ({self._num_shard} shard(s))")
        try:
            self._spawn(group)
            self._wait_ready(group)
        except GroupError as error:
            self._abort(group, error)
            raise
        except Exception as error:  # noqa: BLE001 - e.g. the shard program cannot be executed
            failure = Unavailable(f"cannot start {group.label}: {error}")
            self._abort(group, failure)
            raise failure from error
        with self._lock:
            if group.cancelled or self._closed:
                failure = Unavailable(f"{group.label} was unloaded while starting")
            else:
                group.load_seconds = time.monotonic() - group.started
                group.settled = True
                self._names[group.name] = group.key
                self._set(group, State.READY)
                self._sink.launcher(f"{group.label} ready in {group.load_seconds:.1f} s", group=group.key)
                return self._info(group)
        self._abort(group, failure)
        raise failure

    def _spawn(self, group: _Group) -> None:
        for rank in range(self._num_shard):
            spec = self._spec_factory(group.target, rank, group.prefix, group.master_port)
            spec = dataclasses.replace(spec, group=group.key, tag=group.tag)
            with self._lock:
                self._check_loading(group)
                try:
                    child = self._supervisor.start(spec)
                except StartupFailed as error:
                    raise Unavailable(str(error)) from error
                group.children.append(child)
        with self._lock:
            self._emit(group)  # still LOADING, now with its pids

    def _wait_ready(self, group: _Group) -> None:
        """Poll Health until every rank answers; a death, an Unload, a stop or the deadline raises."""
        deadline = time.monotonic() + self._startup_timeout
        while True:
            with self._lock:
                self._check_loading(group)
            dead = next((c for c in group.children if not c.alive()), None)
            if dead is not None:
                how = dead.exit_description()
                message = f"shard rank {dead.spec.rank} of {group.label} died while starting ({how})"
                lines = report_death(self._sink, dead, message)
                raise Unavailable("\n".join([message, *lines]))
            pending = self._probe(group.children)
            if not pending:
                return
            if time.monotonic() >= deadline:
                why = "; ".join(f"{child.name}: {reason}" for child, reason in pending.items())
                raise Unavailable(f"{group.label} did not become ready within {self._startup_timeout:g} s ({why})")
            with self._changed:
                self._changed.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def _check_loading(self, group: _Group) -> None:
        """Under the lock: raise when the group's load must stop (unloaded meanwhile, launcher stopping)."""
        self._check_open()
        if group.cancelled:
            raise Unavailable(f"{group.label} was unloaded while starting")

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the launcher is stopping")

    def _abort(self, group: _Group, error: GroupError) -> None:
        """A load failed: reap what was spawned; FAILED unless an Unload took the group over."""
        self._sink.launcher(f"loading {group.label} failed: {error}", "ERROR", group=group.key)
        self._supervisor.stop_children(group.children, min(self._grace_s, FAILURE_GRACE_S))
        with self._lock:
            group.settled = True
            group.error = error
            if group.cancelled:
                self._changed.notify_all()  # the Unload waiting on this load finishes the group
                return
            group.reason = str(error)
            self._finish(group, State.FAILED)

    # -- Unload

    def unload(self, key: str) -> bool:
        """Stop the group `key` (SIGTERM, SIGKILL after a short grace), reap it; whether it was running.

        A loading group is cancelled: its Load fails UNAVAILABLE. Unloading the default group is allowed;
        the launcher goes on without it. A group another caller is stopping is waited for (False).
        """
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                return False
            if group.state in (State.FAILED, State.STOPPED):
                del self._groups[key]  # forget the failure: the caller has seen it
                return False
            if group.state is State.STOPPING:
                while group.state is State.STOPPING:
                    self._changed.wait(POLL_S)
                return False
            group.cancelled = group.state is State.LOADING
            group.reason = "unloaded"
            self._names_drop(key)
            self._set(group, State.STOPPING)
            while not group.settled:
                self._changed.wait(POLL_S)
        self._sink.launcher(f"unloading {group.label}", group=key)
        self._supervisor.stop_children(group.children, min(self._grace_s, UNLOAD_GRACE_S))
        with self._lock:
            self._finish(group, State.STOPPED)
        return True

    # -- List and Watch

    def list(self) -> list[GroupInfo]:
        """Every group loading, ready, stopping or recently failed."""
        with self._lock:
            return [self._info(group) for group in self._groups.values()]

    @contextlib.contextmanager
    def watch(self) -> Iterator[queue.SimpleQueue[GroupInfo | None]]:
        """A queue of group snapshots: one per current group, then one per change; None once the launcher stops."""
        events: queue.SimpleQueue[GroupInfo | None] = queue.SimpleQueue()
        with self._lock:
            for group in self._groups.values():
                events.put(self._info(group))
            if self._closed:
                events.put(None)
            self._watchers.append(events)
        try:
            yield events
        finally:
            with self._lock:
                self._watchers.remove(events)

    def close(self) -> None:
        """The launcher is stopping: refuse Loads, make loads in flight give up, end every Watch."""
        with self._lock:
            self._closed = True
            for events in self._watchers:
                events.put(None)
            self._changed.notify_all()

    # -- under the lock

    def _set(self, group: _Group, state: State) -> None:
        group.state = state
        self._emit(group)
        self._changed.notify_all()

    def _finish(self, group: _Group, state: State) -> None:
        """The group's processes are reaped: STOPPED groups leave the list, FAILED ones stay a while."""
        self._set(group, state)
        if state is State.STOPPED and self._groups.get(group.key) is group:
            del self._groups[group.key]

    def _emit(self, group: _Group) -> None:
        info = self._info(group)
        for events in self._watchers:
            events.put(info)

    def _names_drop(self, key: str) -> None:
        for name in [n for n, k in self._names.items() if k == key]:
            del self._names[name]

    def _drop_old_failed(self) -> None:
        failed = [key for key, group in self._groups.items() if group.state is State.FAILED]
        for key in failed[: max(0, len(failed) - KEEP_FAILED + 1)]:
            del self._groups[key]

    def _info(self, group: _Group) -> GroupInfo:
        pids = tuple(c.pid for c in group.children if c.alive())
        return GroupInfo(
            group=group.key,
            name=group.name,
            state=group.state,
            master_socket=f"{group.prefix}-0",
            model_dir=str(group.target.path),
            model_sha=group.target.sha,
            weights_bytes=group.weights_bytes,
            rss_bytes=rss_bytes(pids),
            pids=pids,
            default=group.default,
            load_seconds=group.load_seconds,
            reason=group.reason,
        )


# -- resolving names -----------------------------------------------------------------------------------------------


def target_of(model: Any) -> Target:
    """The group of a model `ember.store.resolve_model` resolved: its sha when it has one, else its path's digest."""
    path = Path(model.path)
    sha = getattr(model, "sha", None) or ""
    return Target(key=sha or path_digest(path), path=path, sha=sha)


def path_digest(path: Path) -> str:
    """A group key for weights known only by their directory."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()


def registry_resolver(args: Any, sink: LogSink) -> Resolver:
    """Names through the model registry (`ember.registry`) where it exists; local paths through the store.

    Progress (download, conversion) goes to the launcher's log.
    """

    def resolve(name: str) -> Target:
        from ember.progress import LogProgress

        progress = LogProgress(stream=LineWriter(sink))
        if _is_path(name):
            if not Path(name).expanduser().exists():
                raise NotFound(f"model path {name!r} does not exist")
            return _store_target(name, args.cache_dir, progress)
        return _registry_target(name, args.cache_dir, progress)

    return resolve


def _is_path(name: str) -> bool:
    """A path spelled as one (`/x`, `./x`, `~/x`), or what the store takes as one (a directory, a .gguf file)."""
    if name.startswith(("/", "./", "../", "~")):
        return True
    candidate = Path(name).expanduser()
    return candidate.is_dir() or (candidate.is_file() and candidate.suffix.lower() == ".gguf")


def _registry_target(name: str, cache_dir: str | None, progress: Any) -> Target:
    from ember.model_names import ModelNameError
    from ember.registry import ModelNotFound, Registry

    registry = Registry(cache_dir)
    try:
        manifest = registry.resolve(name, progress)
    except ModelNameError as error:
        raise InvalidName(str(error)) from error
    except ModelNotFound as error:
        raise NotFound(str(error) or f"model {name!r} not found") from error
    path = Path(registry.model_dir(manifest, progress))
    digest = str(manifest.digest).split(":", 1)[-1]
    return Target(key=manifest.group_key, path=path, sha=digest, quantize=manifest.precision)


def _store_target(path: str, cache_dir: str | None, progress: Any) -> Target:
    """A local directory or .gguf file, resolved (and a GGUF converted once) by the store."""
    from ember.store import ModelStoreError, resolve_model

    try:
        return target_of(resolve_model(path, cache_dir=cache_dir, progress=progress))
    except ModelStoreError as error:
        raise Unservable(str(error)) from error


# -- facts about a group -------------------------------------------------------------------------------------------


def sharding_problem_of(model_dir: Path, num_shard: int) -> str | None:
    """Why the model in `model_dir` cannot run on `num_shard` ranks; None when it can or when no config says."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None  # the shard reports a missing config with its own message
    return sharding_problem(json.loads(config_file.read_text()), num_shard)


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the weight files (`*.safetensors`) in the model directory."""
    try:
        return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors") if p.is_file())
    except OSError:
        return 0


def rss_bytes(pids: tuple[int, ...] | list[int]) -> int:
    """Resident memory of the processes, summed from /proc/<pid>/status (0 for a process gone or unreadable)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total


def free_port() -> int:
    """A TCP port nothing listens on now, for one group's torch.distributed rendezvous."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
