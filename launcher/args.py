"""The launcher's flags: TGI's names, meanings and defaults, each also read from its env var.

Every flag is declared once in `FLAGS`, so its help text, its environment
variable (the flag name upper-snake-cased, as TGI's clap `env` does) and whether
the router receives it stay in one place. A TGI deployment file (flags or env)
therefore works with the image swapped. Precedence: command line, then the
environment, then the default.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

DEFAULT_MODEL_ID = "smollm2"
DTYPES = ("float32", "bfloat16", "float16")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_SIZE_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_bool(text: str | bool) -> bool:
    """`true/false/1/0/yes/no/on/off`, as env vars and `--sharded true` spell booleans."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def parse_bytes(text: str) -> int:
    """A byte count: plain (`2000000000`) or with a unit (`512MB`, `2GiB`, `1.5G`)."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size in bytes like 2GiB or 500000000, got {text!r}")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** _SIZE_POWER[unit.lower()])


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def batch_sizes(text: str) -> str:
    """`--cuda-graphs`: `0`, or comma-separated positive batch sizes (checked here, parsed by the shard)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts == ["0"]:
        return "0"
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected 0 or comma-separated positive batch sizes, got {text!r}")
    return ",".join(parts)


@dataclass(frozen=True)
class Flag:
    """One launcher flag. `kind` is value, bool (a switch) or list (repeatable)."""

    name: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    kind: str = "value"
    aliases: tuple[str, ...] = ()
    router: bool = False
    env: str = ""
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def env_names(self) -> list[str]:
        """The env var of the flag and of each alias (`MAX_INPUT_LENGTH` too)."""
        primary = self.env or self.dest.upper()
        legacy = [a.lstrip("-").replace("-", "_").upper() for a in self.aliases]
        return [primary, *legacy]


FLAGS: tuple[Flag, ...] = (
    # -- model and shards
    Flag("--model-id", f"Model to serve: `{DEFAULT_MODEL_ID}` (SmolLM2-135M-Instruct), a local Hugging Face "
         "directory or a .gguf file. Resolved and converted once, before any shard starts.",
         default=DEFAULT_MODEL_ID),
    Flag("--num-shard", "Number of tensor-parallel shard processes. Default: 1 on CPU; on CUDA, the number of "
         "visible GPUs (1 when --sharded false).", type=positive_int),
    Flag("--sharded", "Shard the model across ranks (`--sharded` or `--sharded true|false`). true needs "
         "--num-shard >= 2 (or >= 2 visible GPUs); false means one shard.", type=parse_bool, kind="optbool"),
    Flag("--dtype", "Weights and activations dtype of the shards. Default: the shard's choice "
         "(float32 on CPU, the model's dtype on CUDA).", choices=DTYPES),
    Flag("--quantize", "Weight-only quantization of the decoder's linear layers on CPU, multiplied in bf16: "
         "`int8` (a scale per output feature) or `int4` (a scale and minimum per 32 inputs, the layout of "
         "GGUF's Q4_1, so the default model keeps its 4-bit codes). TGI's GPU methods "
         "(awq, gptq, bitsandbytes, ...) are not available. `w4a8`: the int4 weights times activations "
         "quantized to int8 per 32 (llama.cpp's Q4_1 x Q8_1) on Ember's AVX-512 VNNI kernel: faster at every "
         "batch size, 0.75 bytes per weight, less precise.", choices=("int8", "int4", "w4a8")),
    Flag("--kv-cache-dtype", "dtype of the cached keys and values. `auto`: the model's, except bfloat16 for "
         "float32 models on CPU with bf16 matmuls (MATMUL_DTYPE=bfloat16 or --quantize), where decode attention "
         "then reads half the bytes. TGI's fp8 kinds are not available.",
         choices=("auto", "float32", "bfloat16", "float16")),
    Flag("--kv-cache-bytes", "Memory budget of the KV cache of each shard on CPU, in bytes (units like 2GiB "
         "accepted). Default: the shard's choice.", type=parse_bytes),
    Flag("--cuda-memory-fraction", "Fraction of each GPU's memory a shard may use (KV cache sizing).", type=float),
    Flag("--cuda-graphs", "Batch sizes whose decode steps replay CUDA graphs, comma-separated (as TGI); `0` "
         "turns them off. A step's batch is padded up to the next size; larger batches run eagerly. Each "
         "graph is captured the first time its batch size and context width are needed, not at start-up. "
         "Default: 1,2,4,8,16,32,64,128,256 (one shard only; sharded models run eagerly).", type=batch_sizes),
    Flag("--prefill-chunk-tokens", "Most prompt tokens a shard's step runs (Ember; vLLM's chunked prefill): "
         "longer prompts go on in the next steps beside the running requests' tokens, so running streams "
         "never wait for a whole long prompt. `0` runs whole prompts. Default: 256 on CPU, 2048 on CUDA.",
         type=non_negative_int),
    Flag("--cache-dir", "Where fetched and converted models are cached.", env="EMBER_CACHE"),
    # -- processes
    Flag("--shard-uds-path", "Prefix of the shards' unix sockets; rank r listens on `{prefix}-{r}`.",
         default="/tmp/ember-server"),
    Flag("--master-addr", "torch.distributed rendezvous address of the shards.", default="localhost"),
    Flag("--master-port", "torch.distributed rendezvous port of the shards.", type=int, default=29500),
    Flag("--graceful-termination-timeout", "Seconds a child may take to exit after SIGTERM (the router "
         "drains in-flight requests meanwhile) before it is killed.", type=float, default=90.0),
    Flag("--shard-startup-timeout", "Seconds every shard has to load the model and answer Health "
         "(Ember-specific; TGI waits forever).", type=float, default=600.0),
    Flag("--router-startup-timeout", "Seconds the router has to warm up and answer GET /health "
         "(Ember-specific).", type=float, default=300.0),
    Flag("--json-output", "Emit JSON lines (the launcher's and every child's, with role and rank fields) "
         "instead of prefixed text.", kind="bool", router=True),
    # -- router: HTTP
    Flag("--hostname", "Address the HTTP server binds.", default="0.0.0.0", router=True),
    Flag("--port", "Port the HTTP server listens on.", type=int, default=3000, router=True),
    Flag("--api-key", "Require `Authorization: Bearer <key>` on every request.", router=True),
    Flag("--cors-allow-origin", "Origin allowed by CORS (repeatable; the env var takes a comma-separated list).",
         kind="list", router=True),
    Flag("--payload-limit", "Largest request body, in bytes.", type=int, default=2_000_000, router=True),
    Flag("--validation-workers", "Tokenizer workers validating requests.", type=positive_int, default=2,
         router=True),
    Flag("--max-client-batch-size", "Most inputs in one embedding/batch request.", type=positive_int,
         default=4, router=True),
    Flag("--disable-grammar-support", "Refuse requests with a grammar.", kind="bool", router=True),
    # -- router: limits and batching
    Flag("--max-concurrent-requests", "Requests in flight at once; more are answered 429.", type=positive_int,
         default=128, router=True),
    Flag("--max-best-of", "Largest `best_of` accepted.", type=positive_int, default=2, router=True),
    Flag("--max-stop-sequences", "Most stop sequences per request.", type=int, default=4, router=True),
    Flag("--max-top-n-tokens", "Largest `top_n_tokens` accepted.", type=int, default=5, router=True),
    Flag("--max-input-tokens", "Longest prompt in tokens. Default: derived from max total tokens at warmup.",
         type=positive_int, aliases=("--max-input-length",), router=True),
    Flag("--max-total-tokens", "Longest prompt + generation in tokens. Default: derived at warmup.",
         type=positive_int, router=True),
    Flag("--waiting-served-ratio", "Waiting/running ratio above which waiting requests are prefilled "
         "into the running batch.", type=float, default=0.3, router=True),
    Flag("--max-batch-prefill-tokens", "Most tokens in one prefill.", type=positive_int, router=True),
    Flag("--max-batch-total-tokens", "Token budget of a batch. Default: the shards' capacity from warmup.",
         type=positive_int, router=True),
    Flag("--max-waiting-tokens", "Decode steps waiting requests wait before being prefilled anyway.",
         type=int, default=20, router=True),
    Flag("--max-batch-size", "Most requests in one batch. Default: unlimited.", type=positive_int, router=True),
    Flag("--prefill-step-tokens", "Ember: when newcomers join the running batch in a shared forward, the "
         "prompt tokens one step takes on before the next newcomer waits a step (the first always fits).",
         type=positive_int, router=True),
)


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
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="ember-launcher",
        description="Start the Ember shards and router, and supervise them (TGI's launcher flags and env vars).",
    )
    for flag in FLAGS:
        _add_flag(parser, flag, env)
    return parser


def _add_flag(parser: argparse.ArgumentParser, flag: Flag, env: Mapping[str, str]) -> None:
    default = _env_default(parser, flag, env)
    shown = "unset" if default in (None, []) else default
    help_text = f"{flag.help} [env: {flag.env_names[0]}] (default: {shown})"
    names = [flag.name, *flag.aliases]
    if flag.kind == "bool":
        parser.add_argument(*names, dest=flag.dest, action="store_true", default=default, help=help_text)
    elif flag.kind == "optbool":
        parser.add_argument(*names, dest=flag.dest, nargs="?", const=True, type=parse_bool, default=default,
                            metavar="true|false", help=help_text)
    elif flag.kind == "list":
        parser.add_argument(*names, dest=flag.dest, action="append", default=None, metavar="ORIGIN",
                            help=help_text)
        parser.set_defaults(**{f"_env_{flag.dest}": default})
    else:
        parser.add_argument(*names, dest=flag.dest, type=flag.type, default=default, choices=flag.choices,
                            help=help_text)


def _env_default(parser: argparse.ArgumentParser, flag: Flag, env: Mapping[str, str]) -> Any:
    """The flag's default, overridden by the first of its env vars that is set."""
    for name in flag.env_names:
        raw = env.get(name)
        if raw is None:
            continue
        try:
            return _convert_env(flag, raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"invalid value for env var {name}={raw!r}: {exc}")
    if flag.kind == "bool":
        return bool(flag.default)
    return [] if flag.kind == "list" else flag.default


def _convert_env(flag: Flag, raw: str) -> Any:
    if flag.kind in ("bool", "optbool"):
        return parse_bool(raw)
    if flag.kind == "list":
        return [item.strip() for item in raw.split(",") if item.strip()]
    value = flag.type(raw)
    if flag.choices and value not in flag.choices:
        raise ValueError(f"expected one of {', '.join(flag.choices)}")
    return value


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Parse flags (env vars as defaults) and settle `num_shard` to a number of ranks."""
    env = os.environ if environ is None else environ
    parser = build_parser(env)
    args = parser.parse_args(argv)
    for flag in FLAGS:
        if flag.kind == "list":
            env_value = getattr(args, f"_env_{flag.dest}")
            delattr(args, f"_env_{flag.dest}")
            if getattr(args, flag.dest) is None:
                setattr(args, flag.dest, list(env_value))
    try:
        args.num_shard = resolve_num_shard(args.num_shard, args.sharded, visible_gpu_count(env))
    except ValueError as exc:
        parser.error(str(exc))
    return args


def router_flag_argv(args: argparse.Namespace) -> list[str]:
    """The router's share of the launcher's flags, spelled as TGI's router takes them."""
    argv: list[str] = []
    for flag in FLAGS:
        if not flag.router:
            continue
        value = getattr(args, flag.dest)
        if flag.kind == "bool":
            argv += [flag.name] if value else []
        elif flag.kind == "list":
            for item in value:
                argv += [flag.name, item]
        elif value is not None:
            argv += [flag.name, str(value)]
    return argv
