"""Every setting of Ember, declared once: flag, env var, type, default, help, and which processes read it.

The launcher's, the router's and the shard's command lines are all built from
`SETTINGS`, so a setting cannot drift between them: `ember-launcher` shows the
user-facing ones (TGI's flag names and env vars where TGI has them) and passes
each value on explicitly, as a flag, to the processes listed in `readers`.
`internal` settings are the wiring the launcher computes itself (a rank, a
socket, the tokenizer directory): the children accept them, the launcher does
not offer them.

Precedence everywhere: command line, then the environment, then the default.
Code that needs a setting outside a command line (a library function called
by a test, say) reads it through `value(name)`, which parses the env var with
the same rules; nothing else reads `os.environ` for a setting.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MODEL_ID = "smollm2"
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE_KINDS = ("int8", "int4", "w4a8")
LAUNCHER, ROUTER, SHARD = "launcher", "router", "shard"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_SIZE_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


# --- value parsers ---------------------------------------------------------------------------------------------


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


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def batch_sizes(text: str) -> str:
    """`--cuda-graphs`: `0`, or comma-separated positive batch sizes (checked here, parsed by the shard)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts == ["0"]:
        return "0"
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected 0 or comma-separated positive batch sizes, got {text!r}")
    return ",".join(parts)


def quantize_kind(text: str) -> str:
    """`--quantize`: one of QUANTIZE_KINDS, or `none` to refuse the automatic choice."""
    value = text.strip().lower()
    if value not in (*QUANTIZE_KINDS, "none"):
        raise argparse.ArgumentTypeError(f"expected one of {', '.join((*QUANTIZE_KINDS, 'none'))}, got {text!r}")
    return value


def _keep_alive(text: str) -> str:
    """`--keep-alive`: checked here (seconds or a Go duration), kept as written for the router to apply."""
    from ember.durations import DurationError, keep_alive_text

    try:
        keep_alive_text(text)
    except DurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text.strip()


# --- the registry ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting. `kind`: value, bool (a switch), optbool (`--x` or `--x true|false`) or list (repeatable)."""

    name: str
    help: str
    readers: frozenset[str]
    type: Callable[[str], Any] = str
    default: Any = None
    kind: str = "value"
    env: str = ""
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    internal: bool = False  # computed by the launcher, not offered by it

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env_names(self) -> list[str]:
        """The env var of the setting and of each alias (`MAX_INPUT_LENGTH` too)."""
        primary = self.env or self.dest.upper()
        return [primary, *(a.replace("-", "_").upper() for a in self.aliases)]

    def parse_env(self, raw: str) -> Any:
        if self.kind in ("bool", "optbool"):
            return parse_bool(raw)
        if self.kind == "list":
            return [item.strip() for item in raw.split(",") if item.strip()]
        value = self.type(raw)
        if self.choices and value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}")
        return value


def _s(name: str, help: str, readers: Iterable[str], **kw: Any) -> Setting:
    return Setting(name, help, frozenset(readers), **kw)


L, R, S = (LAUNCHER,), (ROUTER,), (SHARD,)
LS, LR, RS = (LAUNCHER, SHARD), (LAUNCHER, ROUTER), (ROUTER, SHARD)

SETTINGS: tuple[Setting, ...] = (
    # -- the model and its precision
    _s(
        "model-id",
        f"Model to serve: `{DEFAULT_MODEL_ID}` (SmolLM2-135M-Instruct), a local Hugging Face directory "
        "or a .gguf file. Resolved and converted once, before any shard starts; the shards get the resolved "
        "directory, the router the name /info reports.",
        (LAUNCHER, ROUTER, SHARD),
        default=DEFAULT_MODEL_ID,
    ),
    _s(
        "dtype",
        "Activations dtype of the shards. Default: float32 on CPU (with the matmuls' own precision, "
        "see --quantize), the model's dtype on CUDA.",
        LS,
        choices=DTYPES,
    ),
    _s(
        "quantize",
        "Weight quantization of the decoder's linear layers on CPU. Default (unset): the fastest "
        "setting whose quality is stated (benchmarks/results/quality.md): a 4-bit GGUF runs `w4a8` where the CPU "
        "has AVX2 or AVX-512 VNNI, else `int4`; a Q8_0 GGUF `int8`; bf16/fp16 weights run bf16 matmuls where the CPU "
        "has AVX-512 BF16 or AMX; float32 otherwise. `int8`: a scale per output feature; `int4`: a scale and "
        "minimum per 32 inputs (GGUF Q4_1's layout, so its 4-bit codes are kept), multiplied in bf16; `w4a8`: "
        "int4 weights times int8 activations on Ember's int8 kernel, AVX-512 VNNI or AVX2 (llama.cpp's Q4_1 x "
        "Q8_1); `none`: no quantization. TGI's GPU methods (awq, gptq, ...) are not available.",
        LS,
        type=quantize_kind,
    ),
    _s(
        "matmul-dtype",
        "dtype of the decoder's linear weights (Ember). `bfloat16` under float32 activations "
        "keeps embedding, norms, attention and the best logits in float32 and runs the matmuls on the CPU's "
        "bf16 units. Default: chosen with --quantize (given, it turns the automatic choice off).",
        LS,
        choices=DTYPES,
    ),
    _s(
        "kv-cache-dtype",
        "dtype of the cached keys and values. `auto`: the model's, except bfloat16 for float32 "
        "models on CPU with bf16 matmuls or quantized weights, where decode attention then reads half the "
        "bytes. TGI's fp8 kinds are not available.",
        LS,
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
    ),
    _s(
        "kv-cache-bytes",
        "Memory budget of the KV cache of each shard on CPU, in bytes (units like 2GiB "
        "accepted). Default: a share of free memory.",
        LS,
        type=parse_bytes,
    ),
    _s(
        "cuda-memory-fraction",
        "Fraction of each GPU's memory a shard may use (KV cache sizing).",
        LS,
        type=float,
        default=0.9,
    ),
    _s(
        "cuda-graphs",
        "Batch sizes whose decode steps replay CUDA graphs, comma-separated (as TGI); `0` turns "
        "them off. A step's batch is padded up to the next size; larger batches run eagerly. Each graph is "
        "captured the first time its batch size and context width are needed. Default: 1,2,4,...,256 (one "
        "shard only; sharded models run eagerly).",
        LS,
        type=batch_sizes,
    ),
    _s(
        "prefill-chunk-tokens",
        "The prefill budget of a step (Ember; vLLM's max_num_batched_tokens): the most "
        "prompt tokens a shard's step runs beside the running requests' tokens, and what the router lets "
        "newcomers bring into one step. Longer prompts go on in the next steps, so running streams never wait "
        "for a whole long prompt. `0` runs whole prompts. Default: 256 on CPU, 2048 on CUDA.",
        LS,
        type=non_negative_int,
        aliases=("prefill-step-tokens",),
    ),
    _s(
        "prefix-caching",
        "Automatic prefix caching (vLLM's and TGI v3's): full KV blocks stay cached under the tokens they "
        "hold and everything before them, and a prompt that begins with cached blocks computes only the "
        "rest; idle cached blocks are evicted least recently used, only when free blocks run out. `false` "
        "turns it off.",
        LS,
        type=parse_bool,
        default=True,
        kind="optbool",
    ),
    _s(
        "speculate",
        "N-gram speculative decoding (TGI's flag; vLLM's `ngram` prompt lookup): a decoding request proposes up "
        "to N tokens by matching its last tokens against its own prompt and output, and one forward verifies "
        "them; accepted tokens arrive together. Outputs are unchanged (greedy token for token; sampling keeps "
        "its distribution and seed). Each step drafts only as many tokens as the step times measured at warmup "
        "and the acceptance seen so far say will pay, so large batches run without. `0` turns it off.",
        LS,
        type=non_negative_int,
        default=0,
    ),
    _s(
        "speculate-policy",
        "How many of the drafts `--speculate` finds a step verifies (Ember). `measured`: as many as the step "
        "times measured at warmup and each request's acceptance say will pay, none in large batches; `always`: "
        "every draft, as TGI does (where a step costs the same for one token or a few, as on a GPU).",
        LS,
        default="measured",
        choices=("measured", "always"),
    ),
    _s(
        "prefill-chunking",
        "Newcomers share the running batch's forward (one Prefill carrying the running "
        "batch, cut into --prefill-chunk-tokens steps) where the shard can; `false`: TGI's separate prefills "
        "ruled by --waiting-served-ratio and --max-waiting-tokens.",
        LR,
        type=parse_bool,
        default=True,
        kind="optbool",
    ),
    _s(
        "native-kernels",
        "Build and use Ember's C kernels on CPU (Ember); `false`: torch ops only.",
        LS,
        type=parse_bool,
        default=True,
        kind="optbool",
        env="EMBER_NATIVE",
    ),
    _s(
        "num-threads",
        "torch intra-op threads of each shard. Default: the CPUs the process may run on (its affinity, "
        "bounded by a cgroup CPU quota such as Docker's --cpus or Kubernetes' limits.cpu) divided by the "
        "number of shards.",
        LS,
        type=positive_int,
        env="OMP_NUM_THREADS",
    ),
    _s(
        "cache-dir",
        "Where fetched and converted models and built kernels are cached (default ~/.cache/ember).",
        (LAUNCHER, ROUTER, SHARD),
        env="EMBER_CACHE",
    ),
    # -- processes
    _s(
        "num-shard",
        "Number of tensor-parallel shard processes. Default: 1 on CPU; on CUDA, the number of "
        "visible GPUs (1 when --sharded false).",
        L,
        type=positive_int,
    ),
    _s(
        "sharded",
        "Shard the model across ranks (`--sharded` or `--sharded true|false`). true needs "
        "--num-shard >= 2 (or >= 2 visible GPUs); false means one shard.",
        L,
        type=parse_bool,
        kind="optbool",
    ),
    _s(
        "shard-uds-path",
        "Prefix of the shards' unix sockets; rank r listens on `{prefix}-{r}`.",
        L,
        default="/tmp/ember-server",
    ),
    _s("master-addr", "torch.distributed rendezvous address of the shards.", LS, default="localhost"),
    _s("master-port", "torch.distributed rendezvous port of the shards.", LS, type=int, default=29500),
    _s(
        "graceful-termination-timeout",
        "Seconds a child may take to exit after SIGTERM (the router drains "
        "in-flight requests meanwhile) before it is killed.",
        L,
        type=float,
        default=90.0,
    ),
    _s(
        "shard-startup-timeout",
        "Seconds every shard has to load the model and answer Health (Ember-specific; TGI waits forever).",
        L,
        type=float,
        default=600.0,
    ),
    _s(
        "router-startup-timeout",
        "Seconds the router has to warm up and answer GET /health (Ember-specific).",
        L,
        type=float,
        default=300.0,
    ),
    _s(
        "json-output",
        "Emit JSON lines (the launcher's and every child's, with role and rank fields) instead of prefixed text.",
        (LAUNCHER, ROUTER, SHARD),
        kind="bool",
    ),
    _s(
        "log-level",
        "Log level of the shards and the router.",
        (LAUNCHER, ROUTER, SHARD),
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
    _s(
        "otlp-endpoint",
        "OpenTelemetry collector that the router and the shards send traces to, OTLP over gRPC "
        "(`http://collector:4317`; `https://` for TLS). One trace per request across the processes: "
        "validation, queue, inference and every shard call. Unset: no tracing, and OpenTelemetry is not "
        "even imported. The SDK's OTEL_* variables (OTEL_TRACES_SAMPLER, OTEL_BSP_SCHEDULE_DELAY, ...) apply.",
        (LAUNCHER, ROUTER, SHARD),
    ),
    _s(
        "otlp-service-name",
        "Service name of the traces: the router reports it as given, the shards with `.shard` appended "
        "(`ember` and `ember.shard` by default; TGI's router reports text-generation-inference.router, its "
        "shards text-generation-inference.server).",
        (LAUNCHER, ROUTER, SHARD),
        default="ember",
    ),
    # -- router: HTTP
    _s("hostname", "Address the HTTP server binds.", LR, default="0.0.0.0"),
    _s("port", "Port the HTTP server listens on.", LR, type=int, default=3000),
    _s("api-key", "Require `Authorization: Bearer <key>` on every request.", LR),
    _s(
        "cors-allow-origin",
        "Origin allowed by CORS (repeatable; the env var takes a comma-separated list).",
        LR,
        kind="list",
    ),
    _s("payload-limit", "Largest request body, in bytes (413 beyond).", LR, type=int, default=2_000_000),
    _s("validation-workers", "Tokenizer workers validating requests.", LR, type=positive_int, default=2),
    _s("max-client-batch-size", "Most inputs in one embedding/batch request.", LR, type=positive_int, default=4),
    _s("disable-grammar-support", "Refuse requests with a grammar.", LR, kind="bool"),
    _s(
        "grammar-compile-timeout",
        "Seconds the shards may take to build a grammar's index (422 beyond; Ember).",
        LR,
        type=float,
        default=30.0,
    ),
    _s(
        "compute-type",
        "What /info reports as compute_type (TGI reads it from the environment). Default: the shards' device type.",
        LR,
    ),
    _s(
        "event-loop",
        "The router's event loop: `auto` (uvloop when installed) or `asyncio` (Ember).",
        LR,
        default="auto",
        choices=("auto", "asyncio"),
        env="EMBER_EVENT_LOOP",
    ),
    # -- router: limits and batching
    _s(
        "max-concurrent-requests",
        "Requests in flight at once; more are answered 429.",
        LR,
        type=positive_int,
        default=128,
    ),
    _s("max-best-of", "Largest `best_of` accepted.", LR, type=positive_int, default=2),
    _s("max-stop-sequences", "Most stop sequences per request.", LR, type=non_negative_int, default=4),
    _s("max-top-n-tokens", "Largest `top_n_tokens` accepted.", LR, type=non_negative_int, default=5),
    _s(
        "max-input-tokens",
        "Longest prompt in tokens. Default: derived from max total tokens at warmup.",
        LR,
        type=positive_int,
        aliases=("max-input-length",),
    ),
    _s("max-total-tokens", "Longest prompt + generation in tokens. Default: derived at warmup.", LR, type=positive_int),
    _s(
        "waiting-served-ratio",
        "Waiting/running ratio above which waiting requests are prefilled into the "
        "running batch (TGI's rule; with --prefill-chunking false).",
        LR,
        type=float,
        default=0.3,
    ),
    _s("max-batch-prefill-tokens", "Most tokens in one prefill.", LR, type=positive_int),
    _s(
        "max-batch-total-tokens",
        "Token budget of a batch. Default: the shards' capacity from warmup.",
        LR,
        type=positive_int,
    ),
    _s(
        "max-waiting-tokens",
        "Decode steps waiting requests wait before being prefilled anyway.",
        LR,
        type=non_negative_int,
        default=20,
    ),
    _s("max-batch-size", "Most requests in one batch. Default: unlimited.", LR, type=positive_int),
    _s(
        "step-target-ms",
        "Pace prompt chunks by time (Ember): a step that carries running streams runs as many prompt tokens as "
        "fit in this many milliseconds of forward, measured as the server runs, up to --prefill-chunk-tokens. "
        "Default: four times what the step's running streams alone take, at least 100 ms; `0`: no pacing (every step "
        "may carry --prefill-chunk-tokens).",
        LR,
        type=non_negative_float,
    ),
    # -- many models (Ollama's and Jan's model management)
    _s(
        "preload",
        "Registered models to load at start besides --model-id (comma-separated names).",
        LR,
        kind="list",
    ),
    _s(
        "keep-alive",
        "How long a model other than the default stays loaded after its last request: seconds or a Go "
        "duration (`10m`, `1h30m`); 0 unloads it once idle, a negative value keeps it loaded. Ollama routes "
        "may override it per request with `keep_alive`.",
        LR,
        type=_keep_alive,
        default="5m",
        env="KEEP_ALIVE",
    ),
    _s(
        "max-loaded-models",
        "Most models loaded at once, the default included; idle ones are unloaded to make room.",
        LR,
        type=positive_int,
        default=3,
    ),
    _s(
        "models-memory",
        "Bytes the loaded models' weights and KV cache may take together (`12GiB`); idle models are unloaded "
        "to make room. Default: three quarters of the machine's memory.",
        LR,
        type=parse_bytes,
    ),
    _s(
        "strict-model-names",
        "Answer 404 `model_not_found` to OpenAI requests naming an unknown model (vLLM's behaviour) instead of "
        "serving the default model (TGI's).",
        LR,
        kind="bool",
    ),
    _s(
        "disable-model-management",
        "Refuse (403) every route that downloads, deletes, creates, starts or stops models.",
        LR,
        kind="bool",
    ),
    _s(
        "control-uds-path",
        "Unix socket of the launcher's model control service. Default: `{shard-uds-path}-control`.",
        LR,
        internal=True,
    ),
    # -- wiring the launcher computes
    _s("uds-path", "Socket prefix; rank r listens on PREFIX-r.", S, default="/tmp/ember-server", internal=True),
    _s("rank", "This shard's tensor-parallel rank.", S, type=non_negative_int, default=0, internal=True),
    _s("world-size", "Number of tensor-parallel ranks.", S, type=positive_int, default=1, internal=True),
    _s("master-shard-uds-path", "Unix socket of rank 0.", R, default="/tmp/ember-server-0", internal=True),
    _s("tokenizer-name", "Local directory holding the model's tokenizer.", R, internal=True),
    _s("model-sha", "Model revision reported by /info.", R, internal=True),
    _s(
        "graceful-shutdown-timeout",
        "Seconds in-flight requests get to finish on SIGTERM.",
        R,
        type=float,
        default=90.0,
        internal=True,
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def get(name: str) -> Setting:
    return BY_NAME[name]


def default(name: str) -> Any:
    return BY_NAME[name].default


def value(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """A setting's value outside a command line: its env var parsed by the registry's rules, else its default."""
    setting = BY_NAME[name]
    env = os.environ if environ is None else environ
    for var in setting.env_names:
        raw = env.get(var)
        if raw is not None and not (raw == "" and setting.kind == "value"):
            return setting.parse_env(raw)
    return [] if setting.kind == "list" else setting.default


def read_by(process: str, *, offered: bool = False) -> list[Setting]:
    """The settings `process` reads; `offered`: only those the launcher offers (not internal)."""
    return [s for s in SETTINGS if process in s.readers and not (offered and s.internal)]


# --- command lines ---------------------------------------------------------------------------------------------


def add_arguments(
    parser: argparse.ArgumentParser, settings: Iterable[Setting], environ: Mapping[str, str] | None = None
) -> None:
    """Add `settings` to `parser`, each defaulting to its env var (parsed, or a parser error) or its default."""
    env = os.environ if environ is None else environ
    for setting in settings:
        _add(parser, setting, env)


def _add(parser: argparse.ArgumentParser, s: Setting, env: Mapping[str, str]) -> None:
    default = _env_default(parser, s, env)
    shown = "unset" if default in (None, []) else default
    help_text = f"{s.help} [env: {s.env_names[0]}] (default: {shown})"
    names = [s.flag, *(f"--{a}" for a in s.aliases)]
    if s.kind == "bool":
        parser.add_argument(*names, dest=s.dest, action="store_true", default=default, help=help_text)
    elif s.kind == "optbool":
        parser.add_argument(
            *names,
            dest=s.dest,
            nargs="?",
            const=True,
            type=parse_bool,
            default=default,
            metavar="true|false",
            help=help_text,
        )
    elif s.kind == "list":
        parser.add_argument(*names, dest=s.dest, action="append", default=None, metavar="VALUE", help=help_text)
        parser.set_defaults(**{f"_env_{s.dest}": default})
    else:
        parser.add_argument(*names, dest=s.dest, type=s.type, default=default, choices=s.choices, help=help_text)


def _env_default(parser: argparse.ArgumentParser, s: Setting, env: Mapping[str, str]) -> Any:
    for name in s.env_names:
        raw = env.get(name)
        if raw is None or (raw == "" and s.kind == "value"):  # VAR= unsets a value, as scripts write it
            continue
        try:
            return s.parse_env(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"invalid value for env var {name}={raw!r}: {exc}")
    if s.kind == "bool":
        return bool(s.default)
    return [] if s.kind == "list" else s.default


def finish(args: argparse.Namespace, settings: Iterable[Setting]) -> argparse.Namespace:
    """After parse_args: a list setting given on no command line takes its env value."""
    for s in settings:
        if s.kind == "list":
            env_value = getattr(args, f"_env_{s.dest}")
            delattr(args, f"_env_{s.dest}")
            if getattr(args, s.dest) is None:
                setattr(args, s.dest, list(env_value))
    return args


def parse(
    parser: argparse.ArgumentParser,
    process: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """Add the settings `process` reads to `parser` and parse `argv`."""
    settings = read_by(process)
    add_arguments(parser, settings, environ)
    return finish(parser.parse_args(argv), settings)


def argv_for(process: str, args: argparse.Namespace) -> list[str]:
    """The launcher's values of the settings `process` reads, as that process's flags (unset ones left out)."""
    argv: list[str] = []
    for s in read_by(process, offered=True):
        if s.name == "model-id":
            continue  # the launcher resolves it; the children get the resolved path
        value = getattr(args, s.dest)
        if s.kind == "bool":
            argv += [s.flag] if value else []
        elif s.kind == "list":
            for item in value:
                argv += [s.flag, item]
        elif s.kind == "optbool":
            argv += [] if value is None else [s.flag, "true" if value else "false"]
        elif value is not None:
            argv += [s.flag, str(value)]
    return argv
