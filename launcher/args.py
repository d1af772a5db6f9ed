"""The launcher's flags: TGI's names, meanings and defaults, each also read from its env var.

Every setting is declared once, in `ember.settings.SETTINGS`, with its help text,
its environment variable (TGI's name where TGI has one) and the processes that
read it; the launcher offers all but the internal ones and passes each value on
to the shard and router as an explicit flag (`shard_argv`, `router_flag_argv`).
A TGI deployment file (flags or env) therefore works with the image swapped.
Precedence: command line, then the environment, then the default.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from ember import settings
from ember.settings import Setting

FLAGS: tuple[Setting, ...] = tuple(settings.read_by(settings.LAUNCHER, offered=True))


def visible_gpu_count(environ: Mapping[str, str] | None = None) -> int:
    """GPUs the shards would see, found without importing torch (the launcher never does)."""
    env = os.environ if environ is None else environ
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        value = env.get(var)
        if value is None:
            continue
        value = value.strip()
        if value in ("", "none", "void", "-1"):
            return 0
        if value != "all":
            return len([d for d in value.split(",") if d.strip()])
        break
    return _nvidia_smi_count()


def _nvidia_smi_count() -> int:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def resolve_num_shard(num_shard: int | None, sharded: bool | None, gpu_count: int) -> int:
    """TGI's rules for --num-shard/--sharded; ValueError says which combination is wrong."""
    if num_shard is not None:
        if sharded is True and num_shard < 2:
            raise ValueError(f"--sharded is true but --num-shard is {num_shard}; sharding needs at least 2")
        if sharded is False and num_shard != 1:
            raise ValueError(f"--sharded is false but --num-shard is {num_shard}")
        return num_shard
    if sharded is False:
        return 1
    if sharded is None:
        return max(1, gpu_count)
    if gpu_count < 2:
        raise ValueError(
            f"--sharded is true but {gpu_count} GPU(s) are visible; set --num-shard to the number of ranks"
        )
    return gpu_count


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The launcher's parser; `environ` supplies env-var defaults (os.environ when None)."""
    parser = argparse.ArgumentParser(
        prog="ember-launcher",
        description="Start the Ember shards and router, and supervise them (TGI's launcher flags and env vars).",
    )
    settings.add_arguments(parser, FLAGS, environ)
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Parse flags (env vars as defaults) and settle `num_shard` to a number of ranks."""
    env = os.environ if environ is None else environ
    parser = build_parser(env)
    args = settings.finish(parser.parse_args(argv), FLAGS)
    try:
        args.num_shard = resolve_num_shard(args.num_shard, args.sharded, visible_gpu_count(env))
    except ValueError as exc:
        parser.error(str(exc))
    return args


def router_flag_argv(args: argparse.Namespace) -> list[str]:
    """The router's share of the launcher's settings, spelled as the router (and TGI's router) takes them."""
    return settings.argv_for(settings.ROUTER, args)


def shard_flag_argv(args: argparse.Namespace) -> list[str]:
    """The shard's share of the launcher's settings."""
    return settings.argv_for(settings.SHARD, args)
