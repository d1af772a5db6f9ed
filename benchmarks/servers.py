"""Start Ember's processes as users do, for end-to-end tests and benchmarks.

Shared by the shard, router and launcher tests and by the benchmarks that
start processes (tests/conftest.py puts this folder on the path): extend it,
keep one way of starting each process. Readiness is polled with a deadline,
never slept on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from ember.proto import generate_pb2 as pb
from ember.proto import generate_pb2_grpc as pb_grpc

BIN = Path(sys.executable).parent


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, interval: float = 0.05):
    """Poll `predicate` until it returns a truthy value, the deadline passes or `proc` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout}s")


def shard_healthy(socket: str) -> bool:
    if not os.path.exists(socket):
        return False
    try:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            pb_grpc.TextGenerationServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
        return True
    except grpc.RpcError:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_shard(
    model_dir: Path, uds_prefix: str, *extra: str, rank: int = 0, world_size: int = 1, env: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """Spawn `ember-shard serve`; returns the process and the socket path it will listen on."""
    cmd = [
        str(BIN / "ember-shard"),
        "serve",
        "--model-id",
        str(model_dir),
        "--uds-path",
        uds_prefix,
        "--rank",
        str(rank),
        "--world-size",
        str(world_size),
        *extra,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    return proc, f"{uds_prefix}-{rank}"


@contextlib.contextmanager
def shard_process(
    model_dir: Path,
    uds_prefix: str,
    *extra: str,
    rank: int = 0,
    world_size: int = 1,
    timeout: float = 120.0,
    env: dict | None = None,
) -> Iterator[str]:
    """Run `ember-shard serve` and yield its socket path once it answers Health."""
    proc, socket = start_shard(model_dir, uds_prefix, *extra, rank=rank, world_size=world_size, env=env)
    try:
        wait_for(lambda: shard_healthy(socket), timeout, f"shard {rank}", proc)
        yield socket
    finally:
        stop_process(proc)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_router(
    shard_socket: str, tokenizer_dir: Path, *extra: str, model_id: str = "tiny", env: dict | None = None, stderr=None
) -> tuple[subprocess.Popen, str]:
    """Spawn `ember-router` on a free port; returns the process and its base URL."""
    port = free_port()
    cmd = [
        str(BIN / "ember-router"),
        "--master-shard-uds-path",
        shard_socket,
        "--tokenizer-name",
        str(tokenizer_dir),
        "--model-id",
        model_id,
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stderr=stderr)
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def router_process(
    shard_socket: str,
    tokenizer_dir: Path,
    *extra: str,
    model_id: str = "tiny",
    timeout: float = 60.0,
    env: dict | None = None,
    capture: Path | None = None,
) -> Iterator[str]:
    """Run `ember-router` against a running shard; yield its base URL once /health answers.

    `capture`: a file receiving the router's stderr (its logs), for log assertions.
    """
    log = open(capture, "wb") if capture else None
    proc, url = start_router(shard_socket, tokenizer_dir, *extra, model_id=model_id, env=env, stderr=log)
    try:
        wait_for(lambda: http_ok(f"{url}/health"), timeout, "router", proc)
        yield url
    finally:
        stop_process(proc)
        if log:
            log.close()


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

    def __init__(self, *args: str, env: dict[str, str] | None = None, cpus: set[int] | None = None) -> None:
        """`cpus`: the CPUs the launcher and its children may run on (as `taskset` would pin them)."""
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [str(BIN / "ember-launcher"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
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

    def wait_for_line(self, needle: str, timeout: float = 180.0) -> str:
        def seen():
            if self.proc.poll() is not None:
                self._reader.join(5)
                found = next((line for line in self.output() if needle in line), None)
                if found is None:
                    raise AssertionError(
                        f"launcher exited ({self.proc.returncode}) before {needle!r}:\n"
                        + "\n".join(self.output()[-40:])
                    )
                return found
            return next((line for line in self.output() if needle in line), None)

        return wait_for(seen, timeout, f"launcher line {needle!r}")

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


@contextlib.contextmanager
def control_client(socket_path: str | Path) -> Iterator:
    """A stub of the launcher's ModelControl service (`proto/control.proto`) on its unix socket.

    The launcher serves it on `{shard-uds-path}-control` unless told otherwise.
    """
    from ember.proto import control_pb2_grpc

    with grpc.insecure_channel(f"unix://{os.path.abspath(socket_path)}") as channel:
        yield control_pb2_grpc.ModelControlStub(channel)
