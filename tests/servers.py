"""Start Ember's processes as users do, for end-to-end tests.

Shared by the shard, router and launcher tests: extend it, keep one way of
starting each process. Readiness is polled with a deadline, never slept on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def shard_process(model_dir: Path, uds_prefix: str, *extra: str, rank: int = 0, world_size: int = 1,
                  timeout: float = 120.0, env: dict | None = None) -> Iterator[str]:
    """Run `ember-shard serve` and yield its socket path once it answers Health."""
    cmd = [str(BIN / "ember-shard"), "serve", "--model-id", str(model_dir), "--uds-path", uds_prefix,
           "--rank", str(rank), "--world-size", str(world_size), *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    socket = f"{uds_prefix}-{rank}"
    try:
        wait_for(lambda: shard_healthy(socket), timeout, f"shard {rank}", proc)
        yield socket
    finally:
        stop_process(proc)
