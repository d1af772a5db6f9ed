"""ember.hub against the loopback hub (benchmarks/hub_server.py): quant choice, the file set of a safetensors
repository, HF_ENDPOINT / HF_TOKEN / HF_HUB_OFFLINE read at call time, errors, interrupted and corrupted downloads,
progress, and names that must never reach the network or the filesystem."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hub_server import HubServer

from ember import hub
from ember.hub import HubError, InvalidRepoIdError, fetch_gguf, fetch_repo, pick_gguf

GGUF_REPO = "ember-test/tiny-GGUF"
LLAMA_REPO = "ember-test/tiny-llama"
SHARDED_REPO = "ember-test/sharded"
BIG_REPO = "ember-test/big-GGUF"
BIN_REPO = "ember-test/pickles"
BIG_SIZE = 12 * 1024 * 1024  # over huggingface_hub's 10 MiB read chunk, so a cut download has bytes to resume from
LLAMA_EXTRAS = ["README.md", "pytorch_model.bin", "tiny-Q4_K_M.gguf", "images/logo.png", "onnx/model.safetensors"]


def _write_gguf(path: Path, seed: int) -> None:
    """A small valid GGUF (one tensor): bytes with a sha256, not a model anything loads."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_tensor("token_embd.weight", np.random.default_rng(seed).standard_normal(4096).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, tiny_llama_dir) -> Path:
    """Repositories on disk, as the loopback hub serves them."""
    root = tmp_path_factory.mktemp("hub")
    gguf_repo = root / GGUF_REPO
    gguf_repo.mkdir(parents=True)
    _write_gguf(gguf_repo / "tiny-Q4_K_M.gguf", seed=1)
    _write_gguf(gguf_repo / "tiny-Q8_0.gguf", seed=2)
    (gguf_repo / "README.md").write_text("# tiny\n")

    llama = root / LLAMA_REPO
    shutil.copytree(tiny_llama_dir, llama)
    for name in LLAMA_EXTRAS:
        (llama / name).parent.mkdir(parents=True, exist_ok=True)
        (llama / name).write_bytes(name.encode() * 10)

    sharded = root / SHARDED_REPO
    sharded.mkdir(parents=True)
    (sharded / "config.json").write_text('{"model_type": "llama"}')
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    for name in [*shards, "consolidated.safetensors"]:
        (sharded / name).write_bytes(name.encode() * 100)

    big = root / BIG_REPO
    big.mkdir(parents=True)
    (big / "big-Q4_K_M.gguf").write_bytes(np.random.default_rng(3).bytes(BIG_SIZE))

    pickles = root / BIN_REPO
    pickles.mkdir(parents=True)
    (pickles / "config.json").write_text("{}")
    (pickles / "pytorch_model.bin").write_bytes(b"pickle")
    return root


def _clear_hub_env(monkeypatch) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub 2.x fetches an "agent harness" list for its user agent from the endpoint it read at import
    # (huggingface.co here); telemetry off keeps every request of these tests on the loopback hub.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture
def server(hub_root, monkeypatch):
    _clear_hub_env(monkeypatch)
    with HubServer(hub_root) as running:
        monkeypatch.setenv("HF_ENDPOINT", running.url)
        yield running


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_file(fetched: hub.HubFile, source: Path) -> None:
    assert fetched.path.read_bytes() == source.read_bytes()
    assert fetched.sha256 == _sha256(source)
    assert fetched.size == source.stat().st_size


# -- choosing files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("quant", "expected"), [(None, "Q4_K_M"), ("latest", "Q4_K_M"), ("q8_0", "Q8_0")])
def test_fetch_gguf_picks_the_quant(server, hub_root, tmp_path, quant, expected):
    files = fetch_gguf(GGUF_REPO, quant, tmp_path)
    assert [f.name for f in files] == [f"tiny-{expected}.gguf"]
    assert files[0].path == tmp_path.resolve() / f"tiny-{expected}.gguf"
    _same_file(files[0], hub_root / GGUF_REPO / files[0].name)
    assert [r.path.rsplit("/", 1)[-1] for r in server.downloads()] == [files[0].name]


def test_fetch_gguf_without_the_quant_lists_those_there(server, tmp_path):
    with pytest.raises(HubError, match="Q5_K_M") as caught:
        fetch_gguf(GGUF_REPO, "Q5_K_M", tmp_path)
    assert "Q4_K_M, Q8_0" in str(caught.value)
    assert server.downloads() == []


def test_pick_gguf_rules():
    names = ["README.md", "m-Q4_K_S.gguf", "m-Q4_K_M.gguf", "m-Q4_K_M-imatrix.gguf", "mmproj-Q8_0.gguf"]
    names += ["big-Q8_0-00002-of-00002.gguf", "big-Q8_0-00001-of-00002.gguf", ".hidden/m-Q2_K.gguf"]
    assert pick_gguf(names, None) == ["m-Q4_K_M.gguf"]  # the plain name beats the -imatrix variant
    assert pick_gguf(names, "Q4_K_S") == ["m-Q4_K_S.gguf"]
    assert pick_gguf(names, "q8_0") == ["big-Q8_0-00001-of-00002.gguf", "big-Q8_0-00002-of-00002.gguf"]
    with pytest.raises(HubError, match="3 GGUF files match 'Q4_K'"):
        pick_gguf(names, "Q4_K")  # no whole-word match, and two that contain it
    with pytest.raises(HubError, match="no GGUF file matches 'Q2_K'"):
        pick_gguf(names, "Q2_K")  # hidden files are no candidates
    assert pick_gguf(["b-F16.gguf", "a-Q8_0.gguf"], "latest") == ["a-Q8_0.gguf"]  # no Q4_K_M: the first
    with pytest.raises(HubError, match="lists 1 of the 2 parts"):
        pick_gguf(["x-Q4_K_M-00002-of-00002.gguf"], None)
    with pytest.raises(HubError, match="holds no GGUF file"):
        pick_gguf(["README.md", "mmproj-F16.gguf"], None)


def test_fetch_repo_takes_what_serving_needs(server, hub_root, tiny_llama_dir, tmp_path):
    files = fetch_repo(LLAMA_REPO, tmp_path)
    names = {f.name for f in files}
    source = {p.name for p in tiny_llama_dir.iterdir() if p.is_file()}
    assert names == source  # config, generation config, tokenizer files, chat template, model.safetensors
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & set(LLAMA_EXTRAS)
    for fetched in files:
        _same_file(fetched, hub_root / LLAMA_REPO / fetched.name)
    assert not (tmp_path / "README.md").exists() and not (tmp_path / "onnx").exists()
    assert {r.path.rsplit("/", 1)[-1] for r in server.downloads()} == names


def test_fetch_repo_follows_the_safetensors_index(server, tmp_path):
    names = [f.name for f in fetch_repo(SHARDED_REPO, tmp_path)]
    assert names == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert server.downloads("consolidated.safetensors") == []


def test_fetch_repo_refuses_pickled_weights(server, tmp_path):
    with pytest.raises(HubError, match="no safetensors weights"):
        fetch_repo(BIN_REPO, tmp_path)
    assert server.downloads() == []


# -- environment read at call time ------------------------------------------------------------------------------------


def test_hf_endpoint_is_read_at_each_call(hub_root, monkeypatch, tmp_path):
    _clear_hub_env(monkeypatch)
    with HubServer(hub_root) as first, HubServer(hub_root) as second:
        monkeypatch.setenv("HF_ENDPOINT", first.url)
        fetch_gguf(GGUF_REPO, "Q8_0", tmp_path / "a")
        monkeypatch.setenv("HF_ENDPOINT", second.url + "/")
        fetch_gguf(GGUF_REPO, "Q8_0", tmp_path / "b")
        assert len(first.downloads()) == 1 and len(second.downloads()) == 1


def test_hf_token_is_sent_as_bearer(server, monkeypatch, tmp_path):
    server.make_private(GGUF_REPO, "s3cret")
    monkeypatch.setenv("HF_TOKEN", "s3cret")
    fetch_gguf(GGUF_REPO, None, tmp_path)
    assert server.requests and all(r.authorization == "Bearer s3cret" for r in server.requests)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_private_repo_without_its_token(server, monkeypatch, tmp_path, token):
    server.make_private(GGUF_REPO, "s3cret")
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(HubError, match="HF_TOKEN") as caught:
        fetch_gguf(GGUF_REPO, None, tmp_path)
    assert ("refused" in str(caught.value)) == bool(token)
    assert not any(p.suffix == ".gguf" for p in tmp_path.rglob("*"))


def test_offline_without_a_previous_fetch_sends_nothing(server, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        fetch_gguf(GGUF_REPO, None, tmp_path)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        fetch_repo(LLAMA_REPO, tmp_path / "repo")
    assert server.requests == []


def test_offline_after_a_fetch_returns_the_checked_files(server, hub_root, monkeypatch, tmp_path):
    online = fetch_gguf(GGUF_REPO, "Q8_0", tmp_path)
    server.clear_requests()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_gguf(GGUF_REPO, "Q8_0", tmp_path) == online
    with pytest.raises(HubError, match="not fetched before: tiny-Q4_K_M.gguf"):
        fetch_gguf(GGUF_REPO, None, tmp_path)
    assert server.requests == []


# -- errors -----------------------------------------------------------------------------------------------------------


def test_missing_repository(server, tmp_path):
    with pytest.raises(HubError, match="no repository ember-test/absent on http://127.0.0.1"):
        fetch_gguf("ember-test/absent", None, tmp_path)


def test_connection_refused(hub_root, monkeypatch, tmp_path):
    _clear_hub_env(monkeypatch)
    with HubServer(hub_root) as stopped:
        url = stopped.url
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(HubError, match=f"from {url} failed: ConnectError"):
        fetch_gguf(GGUF_REPO, None, tmp_path)


@pytest.mark.parametrize(
    "repo_id", ["../etc", "/abs/path", "owner/..", "owner/a\0b", "a/b/c", "owner", "", "..", "o/r--x", "-o/r", 7]
)
def test_bad_repo_ids_are_refused_before_any_request(server, tmp_path, repo_id):
    dest = tmp_path / "dest"
    for fetch in (lambda: fetch_gguf(repo_id, None, dest), lambda: fetch_repo(repo_id, dest)):
        with pytest.raises(InvalidRepoIdError) as caught:
            fetch()
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, HubError)
    assert server.requests == []
    assert list(tmp_path.iterdir()) == []


def test_hostile_file_names_in_a_listing_stay_out(server, tmp_path):
    server.add_sibling(GGUF_REPO, "/abs/evil-Q2_K.gguf")
    server.add_sibling(GGUF_REPO, "../evil-Q3_K.gguf")
    dest = tmp_path / "dest"
    with pytest.raises(HubError, match="unsafe name"):
        fetch_gguf(GGUF_REPO, "Q2_K", dest)
    with pytest.raises(HubError, match="no GGUF file matches 'Q3_K'"):
        fetch_gguf(GGUF_REPO, "Q3_K", dest)  # a '..' path is never a candidate
    assert server.downloads() == [] and not any(r.method == "HEAD" for r in server.requests)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


# -- interrupted and corrupted downloads ------------------------------------------------------------------------------


def test_a_reset_mid_file_fails_and_leaves_nothing_complete(server, hub_root, tmp_path):
    name = "tiny-Q4_K_M.gguf"
    server.drop_after(GGUF_REPO, name, after=1000, reset=True)
    with pytest.raises(HubError, match="ReadError"):
        fetch_gguf(GGUF_REPO, None, tmp_path)
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".gguf", ".incomplete")]
    manifest = json.loads((tmp_path / hub.MANIFEST).read_text())
    assert name not in manifest["checked"]

    (fetched,) = fetch_gguf(GGUF_REPO, None, tmp_path)
    _same_file(fetched, hub_root / GGUF_REPO / name)
    assert [r.range for r in server.downloads(name)] == [None, None]  # the second call downloaded it whole


def test_a_clean_close_mid_file_resumes_with_a_range_request(server, hub_root, tmp_path):
    name = "big-Q4_K_M.gguf"
    server.drop_after(BIG_REPO, name, after=BIG_SIZE - 1024 * 1024)
    (fetched,) = fetch_gguf(BIG_REPO, None, tmp_path)
    _same_file(fetched, hub_root / BIG_REPO / name)
    first, resumed = server.downloads(name)
    assert first.range is None
    start = int(resumed.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start < BIG_SIZE


def test_wrong_bytes_are_a_digest_mismatch_and_deleted(server, hub_root, tmp_path):
    name = "tiny-Q8_0.gguf"
    server.corrupt(GGUF_REPO, name)
    with pytest.raises(HubError, match=f"digest mismatch for {name}"):
        fetch_gguf(GGUF_REPO, "Q8_0", tmp_path)
    assert not (tmp_path / name).exists()

    server.corrupt(GGUF_REPO, name, on=False)
    (fetched,) = fetch_gguf(GGUF_REPO, "Q8_0", tmp_path)
    _same_file(fetched, hub_root / GGUF_REPO / name)


def test_a_small_file_is_checked_against_its_git_blob_id(server, hub_root, tmp_path):
    server.corrupt(SHARDED_REPO, "config.json")
    with pytest.raises(HubError, match="git blob id"):
        fetch_repo(SHARDED_REPO, tmp_path)
    assert not (tmp_path / "config.json").exists()


# -- a second fetch, progress -----------------------------------------------------------------------------------------


def test_a_second_fetch_downloads_nothing_unless_a_file_changed(server, hub_root, tmp_path):
    first = fetch_repo(LLAMA_REPO, tmp_path)
    server.clear_requests()
    assert fetch_repo(LLAMA_REPO, tmp_path) == first
    assert [r.path for r in server.requests] == [f"/api/models/{LLAMA_REPO}"]

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"tampered")
    later = weights.stat().st_mtime + 10  # newer than huggingface_hub's own record of the download
    os.utime(weights, (later, later))
    server.clear_requests()
    assert fetch_repo(LLAMA_REPO, tmp_path) == first
    _same_file(next(f for f in first if f.name == "model.safetensors"), hub_root / LLAMA_REPO / "model.safetensors")
    assert [r.path.rsplit("/", 1)[-1] for r in server.downloads()] == ["model.safetensors"]


def test_progress_counts_bytes_up_to_the_total(server, tmp_path):
    seen: list[tuple[str, int, int | None]] = []
    files = fetch_repo(LLAMA_REPO, tmp_path, progress=lambda *call: seen.append(call))
    downloads = [(done, total) for stage, done, total in seen if stage == "download"]
    total = sum(f.size for f in files)
    assert {t for _, t in downloads} == {total}
    done = [d for d, _ in downloads]
    assert done[0] == 0 and done[-1] == total
    assert all(a < b for a, b in zip(done, done[1:]))  # increasing, each count once
    assert len(done) > len(files)
    hashes = [(done, total) for stage, done, total in seen if stage == "hash"]
    assert hashes[-1] == (total, total)
