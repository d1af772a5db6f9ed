"""`ember-launcher`: resolve the model once, start N shards and the router, supervise them.

Startup follows TGI's launcher: fetch/convert the model (progress shown), spawn
one `ember-shard serve` per rank with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT,
wait until every shard socket answers Health, then spawn `ember-router` and wait
until GET /health answers 200. From then on the launcher only watches:
SIGTERM/SIGINT stop the router (it drains) and then the shards, exit 0; any
child dying stops the rest, prints what died with its last lines, exit 1.
The launcher never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ember.launcher.args import parse_args, router_flag_argv, shard_flag_argv
from ember.launcher.logs import LineWriter, LogSink
from ember.launcher.supervisor import (
    Child,
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
from ember.sharding import sharding_problem

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED_EARLY = 130
CRASH_LINES = 20


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ember-launcher` console script; returns the process exit status."""
    args = parse_args(argv)
    sink = LogSink(sys.stdout, args.json_output)
    try:
        model = _resolve_model(args, sink)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED_EARLY
    except Exception as exc:  # noqa: BLE001 - any resolution failure ends startup with its reason
        sink.launcher(f"cannot resolve model {args.model_id!r}: {exc}", "ERROR")
        return EXIT_FAILED
    problem = _sharding_problem(model.path, args.num_shard)
    if problem:
        sink.launcher(f"cannot shard {model.model_id!r}: {problem}", "ERROR")
        return EXIT_FAILED
    if not _claim_sockets(args, sink):
        return EXIT_FAILED
    supervisor = Supervisor(sink)
    supervisor.install_signal_handlers()
    return run(supervisor, args, model, sink)


def _resolve_model(args: argparse.Namespace, sink: LogSink) -> Any:
    """Fetch/convert once, before any shard starts, so N ranks never race on the cache."""
    from ember.progress import LogProgress
    from ember.store import resolve_model

    sink.launcher(f"resolving model {args.model_id!r}")
    model = resolve_model(args.model_id, cache_dir=args.cache_dir, progress=LogProgress(stream=LineWriter(sink)))
    sink.launcher(f"model {model.model_id!r} is at {model.path} (from {model.source})", path=str(model.path))
    return model


def _sharding_problem(model_dir: Path, num_shard: int) -> str | None:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None  # the shard reports a missing config with its own message
    return sharding_problem(json.loads(config_file.read_text()), num_shard)


def _claim_sockets(args: argparse.Namespace, sink: LogSink) -> bool:
    """Refuse to start over live shards; remove sockets a crashed run left behind."""
    for path in shard_sockets(args.shard_uds_path, args.num_shard):
        if socket_listening(path):
            sink.launcher(
                f"a shard already serves on {path}: another server uses --shard-uds-path {args.shard_uds_path}", "ERROR"
            )
            return False
        if os.path.exists(path):
            os.unlink(path)
    return True


def run(supervisor: Supervisor, args: argparse.Namespace, model: Any, sink: LogSink) -> int:
    """Start, serve until a signal or a death, stop; returns the exit status."""
    graceful = False
    try:
        _start_shards(supervisor, args, model)
        _start_router(supervisor, args, model)
        sink.launcher(f"serving {model.model_id} on http://{args.hostname}:{args.port} with {args.num_shard} shard(s)")
        supervisor.watch()
    except Interrupted as interrupt:
        sink.launcher(f"received {interrupt}: shutting down")
        graceful = True
    except ChildDied as died:
        report_death(sink, died.child)
    except StartupFailed as failed:
        sink.launcher(str(failed), "ERROR")
    finally:
        supervisor.stop(graceful, args.graceful_termination_timeout)
    sink.launcher("shutdown complete" if graceful else "stopped after a failure")
    return EXIT_OK if graceful else EXIT_FAILED


def _start_shards(supervisor: Supervisor, args: argparse.Namespace, model: Any) -> None:
    shards = [supervisor.start(shard_spec(args, model, rank)) for rank in range(args.num_shard)]
    supervisor.wait_ready(lambda: _shards_pending(shards), args.shard_startup_timeout)
    supervisor.sink.launcher(f"all {len(shards)} shard(s) answer Health")


def _shards_pending(shards: list[Child]) -> dict[Child, str]:
    """Shards not serving yet: first every socket must exist, then all answer one Health broadcast."""
    missing = {c: f"socket {c.spec.sockets[0]} not there yet" for c in shards if not os.path.exists(c.spec.sockets[0])}
    if missing:
        return missing
    failed = set(shard_health([c.spec.sockets[0] for c in shards]))
    return {c: "its socket does not answer Health" for c in shards if c.spec.sockets[0] in failed}


def _start_router(supervisor: Supervisor, args: argparse.Namespace, model: Any) -> None:
    router = supervisor.start(router_spec(args, model))
    url = f"http://{probe_host(args.hostname)}:{args.port}/health"
    supervisor.wait_ready(
        lambda: {} if http_health(url) else {router: f"GET {url} is not 200 yet"}, args.router_startup_timeout
    )
    supervisor.sink.launcher("router answers GET /health")


def shard_sockets(prefix: str, num_shard: int) -> list[str]:
    """Rank r's socket is `{prefix}-{r}`, as in TGI."""
    return [f"{prefix}-{rank}" for rank in range(num_shard)]


def shard_spec(args: argparse.Namespace, model: Any, rank: int) -> ChildSpec:
    """The `ember-shard serve` command line and environment of one rank."""
    socket = shard_sockets(args.shard_uds_path, args.num_shard)[rank]
    argv = [
        *console_script("ember-shard", "ember.shard.cli"),
        "serve",
        "--model-id",
        str(model.path),
        "--uds-path",
        args.shard_uds_path,
        "--rank",
        str(rank),
        "--world-size",
        str(args.num_shard),
    ]
    env = _child_env()
    # torch.distributed's own contract (not Ember settings): what its env:// rendezvous would read.
    env.update(
        RANK=str(rank), WORLD_SIZE=str(args.num_shard), MASTER_ADDR=args.master_addr, MASTER_PORT=str(args.master_port)
    )
    argv += shard_flag_argv(args)  # every shard setting, explicitly: nothing rides on the environment
    return ChildSpec("shard", rank, argv, env, sockets=[socket])


def router_spec(args: argparse.Namespace, model: Any) -> ChildSpec:
    """The `ember-router` command line: rank 0's socket, the tokenizer directory, TGI's router flags."""
    argv = [
        *console_script("ember-router", "ember.router.cli"),
        "--master-shard-uds-path",
        shard_sockets(args.shard_uds_path, args.num_shard)[0],
        "--tokenizer-name",
        str(model.path),
        "--model-id",
        str(model.model_id),
    ]
    if getattr(model, "sha", None):
        argv += ["--model-sha", str(model.sha)]
    # The router drains for the launcher's whole grace period, a little less so it exits before SIGKILL.
    argv += ["--graceful-shutdown-timeout", str(max(args.graceful_termination_timeout - 1.0, 0.0))]
    return ChildSpec("router", None, argv + router_flag_argv(args), _child_env())


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the launcher as they are written
    return env


def console_script(name: str, module: str) -> list[str]:
    """How to run one of our console scripts: beside this interpreter, else on PATH, else via `-c`."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def report_death(sink: LogSink, child: Child) -> None:
    """Say which child died, how, and what it printed last."""
    child.output.join(timeout=1.0)  # let its final traceback reach the ring buffer
    lines = child.output.last_lines(CRASH_LINES)
    code = child.popen.returncode
    fields = {
        "child": child.name,
        "exit_code": code if code is not None and code >= 0 else None,
        "signal": -code if code is not None and code < 0 else None,
    }
    message = f"{child.name} died ({child.exit_description()})"
    if sink.json_output:
        sink.launcher(message, "ERROR", last_lines=lines, **fields)
        return
    sink.launcher(f"{message}; its last {len(lines)} lines:", "ERROR", **fields)
    for line in lines:
        sink.launcher(f"  {child.name} | {line}")


if __name__ == "__main__":
    sys.exit(main())
