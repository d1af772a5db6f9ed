"""`ember-launcher`: resolve the model once, start N shards and the router, supervise them.

Startup follows TGI's launcher: fetch/convert the model (progress shown), spawn
one `ember-shard serve` per rank with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT,
wait until every shard socket answers Health, then serve the model control
service (`ember.launcher.control`) on `{shard-uds-path}-control`, spawn
`ember-router` and wait until GET /health answers 200. From then on the launcher
watches, and loads or unloads further shard groups when the router asks
(`ember.launcher.groups`): SIGTERM/SIGINT stop the router (it drains), the
control service and then every group's shards, exit 0. The router's death, or a
death of a default-model rank while that group is loaded, stops the rest,
prints what died with its last lines, exit 1; a rank of a group loaded on demand
that dies fails only its group.
The launcher never imports torch (unless it converts a GGUF itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ember import lifeline
from ember.launcher.args import parse_args, router_flag_argv, shard_flag_argv
from ember.launcher.groups import (
    GroupManager,
    Resolver,
    Target,
    registry_resolver,
    sharding_problem_of,
    target_of,
)
from ember.launcher.logs import LineWriter, LogSink
from ember.launcher.supervisor import (
    CRASH_LINES,  # noqa: F401 - part of this module's interface before it moved
    Child,
    ChildDied,
    ChildSpec,
    Interrupted,
    StartupFailed,
    Supervisor,
    http_health,
    probe_host,
    report_death,
    shards_pending,
    socket_listening,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED_EARLY = 130


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
    return sharding_problem_of(model_dir, num_shard)


def control_socket(args: argparse.Namespace) -> str:
    """The model control service's socket: `--control-uds-path` where given, else `{shard-uds-path}-control`."""
    return getattr(args, "control_uds_path", None) or f"{args.shard_uds_path}-control"


def _claim_sockets(args: argparse.Namespace, sink: LogSink) -> bool:
    """Refuse to start over live shards or a live control service; remove sockets a crashed run left behind."""
    for path in [*shard_sockets(args.shard_uds_path, args.num_shard), control_socket(args)]:
        if socket_listening(path):
            sink.launcher(
                f"a server already listens on {path}: another launcher uses --shard-uds-path {args.shard_uds_path}",
                "ERROR",
            )
            return False
        if os.path.exists(path):
            os.unlink(path)
    return True


def run(
    supervisor: Supervisor, args: argparse.Namespace, model: Any, sink: LogSink, resolver: Resolver | None = None
) -> int:
    """Start, serve until a signal or a fatal death, stop; returns the exit status.

    `resolver` turns the names the control service is asked to Load into model directories
    (default: `registry_resolver`).
    """
    from ember.launcher.control import ControlServer

    graceful = False
    groups: GroupManager | None = None
    control: ControlServer | None = None
    try:
        started, target = time.monotonic(), target_of(model)
        shards = _start_shards(supervisor, args, model, target)
        groups = _group_manager(supervisor, args, resolver or registry_resolver(args, sink))
        groups.adopt_default(str(model.model_id), target, shards, args.master_port, time.monotonic() - started)
        supervisor.on_child_exit(groups.child_exited)
        server = ControlServer(control_socket(args), groups)
        server.start()
        control = server
        sink.launcher(f"model control service on {control.path}")
        _start_router(supervisor, args, model)
        sink.launcher(f"serving {model.model_id} on http://{args.hostname}:{args.port} with {args.num_shard} shard(s)")
        supervisor.watch()
    except Interrupted as interrupt:
        sink.launcher(f"received {interrupt}: shutting down")
        graceful = True
    except ChildDied as died:
        report_death(sink, died.child)
    except (StartupFailed, OSError) as failed:
        sink.launcher(str(failed), "ERROR")
    finally:
        supervisor.stop(graceful, args.graceful_termination_timeout, between=lambda: _stop_control(groups, control))
    sink.launcher("shutdown complete" if graceful else "stopped after a failure")
    return EXIT_OK if graceful else EXIT_FAILED


def _stop_control(groups: GroupManager | None, control: Any) -> None:
    """Once the router is stopped (it may ask for models while it drains): end loads and watches, close the socket.

    No shard starts meanwhile: the supervisor refuses new children from the moment it began stopping.
    """
    if groups is not None:
        groups.close()
    if control is not None:
        control.stop()


def _group_manager(supervisor: Supervisor, args: argparse.Namespace, resolver: Resolver) -> GroupManager:
    """Groups loaded on demand get the default group's shard flags, sockets `{prefix}-g{n}-{rank}`, a port each."""

    def spec(target: Target, rank: int, prefix: str, master_port: int) -> ChildSpec:
        return shard_spec(args, target, rank, prefix=prefix, master_port=master_port)

    return GroupManager(
        supervisor,
        resolver,
        spec,
        prefix=args.shard_uds_path,
        num_shard=args.num_shard,
        startup_timeout=args.shard_startup_timeout,
        grace_s=args.graceful_termination_timeout,
    )


def _start_shards(supervisor: Supervisor, args: argparse.Namespace, model: Any, target: Target) -> list[Child]:
    specs = [dataclasses.replace(shard_spec(args, model, rank), group=target.key) for rank in range(args.num_shard)]
    shards = [supervisor.start(spec) for spec in specs]
    supervisor.wait_ready(lambda: shards_pending(shards), args.shard_startup_timeout)
    supervisor.sink.launcher(f"all {len(shards)} shard(s) answer Health")
    return shards


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


def shard_spec(
    args: argparse.Namespace, model: Any, rank: int, prefix: str | None = None, master_port: int | None = None
) -> ChildSpec:
    """The `ember-shard serve` command line and environment of one rank.

    `prefix` and `master_port` place a group loaded on demand beside the default one
    (default: `--shard-uds-path` and `--master-port`); a model registered with its own precision gets it as
    `--quantize`; every other shard flag is the same.
    """
    prefix = prefix or args.shard_uds_path
    if master_port is not None and master_port != args.master_port:
        args = argparse.Namespace(**{**vars(args), "master_port": master_port})
    if getattr(model, "quantize", None):  # a model registered with its own precision (Ollama's create quantize)
        args = argparse.Namespace(**{**vars(args), "quantize": model.quantize})
    socket = shard_sockets(prefix, args.num_shard)[rank]
    argv = [
        *console_script("ember-shard", "ember.shard.cli"),
        "serve",
        "--model-id",
        str(model.path),
        "--uds-path",
        prefix,
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
    """The `ember-router` command line: rank 0's socket, the control socket, the tokenizer directory, TGI's flags."""
    argv = [
        *console_script("ember-router", "ember.router.cli"),
        "--master-shard-uds-path",
        shard_sockets(args.shard_uds_path, args.num_shard)[0],
        "--control-uds-path",
        control_socket(args),
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
    env.update(lifeline.parent_env())  # children exit when this launcher is gone, even by SIGKILL
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


if __name__ == "__main__":
    sys.exit(main())
