"""Process supervision: start children in their own process groups, wait until they serve, stop them.

Everything the launcher's main thread waits for arrives on one queue: a child
exiting (a waiter thread per child) or a signal (the handler only enqueues,
which `queue.SimpleQueue.put` allows from a signal handler). The main thread is
therefore never stuck in a blocking call when a shard dies during startup or
a SIGTERM arrives, and every wait has a deadline. An exit is fatal (`ChildDied`)
unless the exit handler claims it: the group manager (`ember.launcher.groups`)
claims the ranks of shard groups it loaded on demand, whose death stops only
their group.

The control service's threads start and stop such groups too, so the children
list is guarded by a lock, and `stop_children` stops children without touching
the main thread's queue (it waits on the processes themselves).

Children are each the leader of their own process group: a terminal's Ctrl-C
reaches only the launcher, which then stops the router first (so it can drain
in-flight requests) and the shards after it, and a signal sent to a child's
group also reaches anything that child spawned, so nothing is orphaned.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.launcher.logs import ChildOutput, LogSink, child_label

POLL_S = 0.1
FAILURE_GRACE_S = 5.0
"""After a child died the others get this long to exit on SIGTERM: they may be stuck in a collective."""
CRASH_LINES = 20
"""Lines of a dead child's output that its death report shows."""

ExitHandler = Callable[["Child"], bool]
"""Told of every child exit the main thread sees; True when the exit is handled and not fatal."""


@dataclass
class ChildSpec:
    """What to run for one child: `role` (shard/router), its rank (None for the router), argv and env."""

    role: str
    rank: int | None
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    sockets: list[str] = field(default_factory=list)
    """Files the child owns and must not outlive it (a shard's unix socket)."""
    group: str | None = None
    """Key of the shard group the child is a rank of (None: the router)."""
    tag: str = ""
    """Short label of an on-demand shard group (`g1`) shown with the child's name; empty for the default group."""

    @property
    def name(self) -> str:
        return child_label(self.role, self.rank, self.tag)


@dataclass(frozen=True)
class ChildExited:
    child: Child


@dataclass(frozen=True)
class SignalReceived:
    signum: int


class ChildDied(Exception):
    """A child exited on its own: the whole server stops."""

    def __init__(self, child: Child) -> None:
        super().__init__(f"{child.name} died: {child.exit_description()}")
        self.child = child


class StartupFailed(Exception):
    """A child did not become ready before its deadline."""


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: stop gracefully."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Child:
    """A running child process with its output pump."""

    def __init__(self, spec: ChildSpec, popen: subprocess.Popen, output: ChildOutput) -> None:
        self.spec = spec
        self.popen = popen
        self.output = output

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, signum: int) -> None:
        """Signal the child's whole process group (it is the group leader); gone groups are fine."""
        try:
            os.killpg(self.popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def exit_description(self) -> str:
        code = self.popen.poll()
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        return f"exit code {code}"


class Supervisor:
    """Owns the children: spawns them, waits on readiness and events, and stops them in order."""

    def __init__(self, sink: LogSink, keep_lines: int = 50) -> None:
        self.sink = sink
        self._keep = keep_lines
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._children: list[Child] = []
        self._lock = threading.Lock()
        self._closed = False
        self._exit_handler: ExitHandler | None = None

    @property
    def children(self) -> list[Child]:
        """The children started and not yet forgotten (a copy: other threads may start or stop some)."""
        with self._lock:
            return list(self._children)

    def on_child_exit(self, handler: ExitHandler | None) -> None:
        """Route child exits through `handler` before they become fatal (see `ExitHandler`)."""
        self._exit_handler = handler

    # -- signals and events

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT become events on the queue (main thread only, as Python requires)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._events.put(SignalReceived(signum))

    def _next_event(self, timeout: float) -> ChildExited | SignalReceived | None:
        try:
            return self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def _raise_for(self, event: ChildExited | SignalReceived | None) -> None:
        if isinstance(event, SignalReceived):
            raise Interrupted(event.signum)
        if isinstance(event, ChildExited):
            handler = self._exit_handler
            if handler is not None and handler(event.child):
                return
            raise ChildDied(event.child)

    # -- spawning

    def start(self, spec: ChildSpec) -> Child:
        """Start a child as the leader of a new process group, with its output pumped into the sink.

        Any thread may call it; once `stop` began it refuses (StartupFailed), so no child outlives the launcher.
        """
        with self._lock:
            if self._closed:
                raise StartupFailed(f"not starting {spec.name}: the launcher is stopping")
            popen = subprocess.Popen(
                spec.argv,
                env=spec.env or None,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
            output = ChildOutput(spec.role, spec.rank, popen.stdout, self.sink, keep=self._keep, group=spec.tag)
            child = Child(spec, popen, output)
            self._children.append(child)
        output.start()
        threading.Thread(target=self._wait_child, args=(child,), name=f"wait-{spec.name}", daemon=True).start()
        self.sink.launcher(f"started {spec.name} (pid {popen.pid})", child=spec.name, pid=popen.pid)
        return child

    def _wait_child(self, child: Child) -> None:
        child.popen.wait()
        self._events.put(ChildExited(child))

    # -- waiting

    def wait_ready(self, probe: Callable[[], dict[Child, str]], timeout: float) -> None:
        """Poll `probe` (children not ready yet -> why) until it is empty; a death, a signal or the deadline raises."""
        deadline = time.monotonic() + timeout
        while True:
            pending = probe()
            if not pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartupFailed(
                    "; ".join(
                        f"{child.name} did not become ready within {timeout:g} s ({why})"
                        for child, why in pending.items()
                    )
                )
            self._raise_for(self._next_event(min(POLL_S, left)))

    def watch(self) -> None:
        """Block until something fatal happens; always raises Interrupted or ChildDied.

        Exits the exit handler claims (an on-demand group's rank) are handed to it and watching goes on.
        """
        while True:
            self._raise_for(self._next_event(3600.0))

    # -- stopping

    def stop(self, graceful: bool, grace_s: float, between: Callable[[], None] | None = None) -> None:
        """Graceful: router first (it drains), then shards, each up to `grace_s`. Else all at once, briefly.

        `between` runs once the router is stopped and before the shards are (the launcher stops its
        control service there). No child starts once this began.
        """
        with self._lock:
            self._closed = True
        if graceful:
            self._terminate(self._role("router"), grace_s)
            if between is not None:
                between()
            self._terminate(self._role("shard"), grace_s)
        else:
            self._terminate(self.children, min(grace_s, FAILURE_GRACE_S))
            if between is not None:
                between()
        for child in self.children:
            _reap(child)

    def stop_children(self, children: list[Child], grace_s: float) -> None:
        """From any thread: stop `children` (SIGTERM, SIGKILL after `grace_s`), reap them, remove their sockets.

        Unlike `stop` it never reads the main thread's event queue; it waits on the processes. Stopped
        children are forgotten, so a server that loads and unloads models for days keeps a short list.
        """
        alive = [c for c in children if c.alive()]
        for child in alive:
            self.sink.launcher(f"stopping {child.name} (SIGTERM)", child=child.name)
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in alive:
            try:
                child.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.sink.launcher(f"{child.name} did not stop in time: SIGKILL", "WARN", child=child.name)
                child.signal_group(signal.SIGKILL)
        for child in children:
            child.popen.wait()
            if child in alive:
                self.sink.launcher(f"{child.name} stopped ({child.exit_description()})", child=child.name)
            _reap(child)
        self.forget(children)

    def forget(self, children: list[Child]) -> None:
        """Drop reaped children from the list `stop` works through."""
        with self._lock:
            self._children = [c for c in self._children if c not in children]

    def _role(self, role: str) -> list[Child]:
        return [c for c in self.children if c.spec.role == role]

    def stopping(self) -> bool:
        with self._lock:
            return self._closed

    def _terminate(self, children: list[Child], grace_s: float) -> None:
        """SIGTERM, wait up to `grace_s` (a second signal cuts it short), then SIGKILL the rest."""
        alive = [c for c in children if c.alive()]
        if not alive:
            return
        for child in alive:
            self.sink.launcher(f"stopping {child.name} (SIGTERM)", child=child.name)
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(c.alive() for c in alive) and time.monotonic() < deadline:
            if isinstance(self._next_event(min(POLL_S, deadline - time.monotonic())), SignalReceived):
                self.sink.launcher("second signal: killing the children now", "WARN")
                break
        for child in alive:
            if child.alive():
                self.sink.launcher(f"{child.name} did not stop in time: SIGKILL", "WARN", child=child.name)
                child.signal_group(signal.SIGKILL)
            child.popen.wait()
            self.sink.launcher(f"{child.name} stopped ({child.exit_description()})", child=child.name)


def _reap(child: Child) -> None:
    """After the child exited: kill the stragglers left in its group, drain its output, remove its sockets."""
    child.signal_group(signal.SIGKILL)
    child.output.join(timeout=2.0)
    _remove_files(child.spec.sockets)


def report_death(sink: LogSink, child: Child, message: str | None = None) -> list[str]:
    """Say which child died, how (or `message`), and what it printed last; returns those last lines."""
    child.output.join(timeout=1.0)  # let its final traceback reach the ring buffer
    lines = child.output.last_lines(CRASH_LINES)
    code = child.popen.returncode
    fields = {
        "child": child.name,
        "exit_code": code if code is not None and code >= 0 else None,
        "signal": -code if code is not None and code < 0 else None,
    }
    message = message or f"{child.name} died ({child.exit_description()})"
    if sink.json_output:
        sink.launcher(message, "ERROR", last_lines=lines, **fields)
        return lines
    sink.launcher(f"{message}; its last {len(lines)} lines:", "ERROR", **fields)
    for line in lines:
        sink.launcher(f"  {child.name} | {line}")
    return lines


def shards_pending(shards: list[Child]) -> dict[Child, str]:
    """Shards not serving yet: first every socket must exist, then all answer one Health broadcast."""
    missing = {c: f"socket {c.spec.sockets[0]} not there yet" for c in shards if not os.path.exists(c.spec.sockets[0])}
    if missing:
        return missing
    failed = set(shard_health([c.spec.sockets[0] for c in shards]))
    return {c: "its socket does not answer Health" for c in shards if c.spec.sockets[0] in failed}


def _remove_files(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def socket_listening(path: str) -> bool:
    """Whether a server accepts connections on the unix socket `path` (no rpc: nothing runs on the shard)."""
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except OSError:
            return False
        return True


def shard_health(socket_paths: list[str], timeout: float = 10.0) -> list[str]:
    """Send Health to every shard at once; returns the paths that did not answer.

    The shards of one group must be asked together: a shard's Health may run a
    forward with collectives, which completes only when every rank runs it.
    """
    import grpc

    from ember.proto import generate_pb2, generate_pb2_grpc

    channels = [grpc.insecure_channel(f"unix://{path}") for path in socket_paths]
    try:
        calls = [
            generate_pb2_grpc.TextGenerationServiceStub(ch).Health.future(generate_pb2.HealthRequest(), timeout=timeout)
            for ch in channels
        ]
        failed = []
        for path, call in zip(socket_paths, calls):
            try:
                call.result()
            except grpc.RpcError:
                failed.append(path)
        return failed
    finally:
        for channel in channels:
            channel.close()


def http_health(url: str, timeout: float = 2.0) -> bool:
    """Whether GET `url` answers 200 (directly: a proxy from the environment must not answer for us)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def probe_host(hostname: str) -> str:
    """The address to reach a server bound to `hostname` from this machine (wildcards become loopback)."""
    if hostname in ("", "0.0.0.0"):
        return "127.0.0.1"
    if hostname == "::":
        return "[::1]"
    return f"[{hostname}]" if ":" in hostname else hostname
