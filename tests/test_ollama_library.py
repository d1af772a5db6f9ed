"""Ollama's library routes (`router/api/ollama/library.py`), the Modelfile and the registry calls they added.

Unit tests run in process: the Modelfile round trip, the registry's `import_blobs` / `adopt_blob` / extras,
and the routes on a Starlette app over a stand-in state (GET/HEAD /, --disable-model-management). The end-to-end
tests run a launcher with a tiny default model and a registry holding `tiny-b`, a loopback Hub serving a GGUF and
a safetensors repository, and call every route with the official `ollama` client and raw httpx; bodies are
checked against `specs/ollama-openapi.yaml` when a checkout has it beside.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import jsonschema
import ollama
import pytest
import yaml
from hub_server import HubServer
from servers import Launcher, free_port
from starlette.applications import Starlette
from starlette.testclient import TestClient
from test_multi_model_e2e import groups, launcher_args
from tiny_gguf import write_tiny_gguf

from ember.registry import Registry, RegistryError
from ember.router.api.ollama import library
from ember.router.api.ollama import modelfile as mf

pytestmark = pytest.mark.timeout(600)

SPEC = Path(__file__).resolve().parents[2] / "shared" / "specs" / "ollama-openapi.yaml"
BAD_NAMES = ("../x", "/abs", "a\0b", "x" * 300, "café")


def check(body: dict, schema: str) -> None:
    """Validate against the spec's schema. Its defects, worked around: none of its schemas mark fields required
    (so presence is asserted by the tests themselves), and `Duration` is a string where Ollama takes numbers too
    (no library route uses it)."""
    if not SPEC.is_file():
        return
    spec = yaml.safe_load(SPEC.read_text())
    jsonschema.validate(body, {"$ref": f"#/components/schemas/{schema}", "components": spec["components"]})


# --- the Modelfile -----------------------------------------------------------------------------------------------


def test_a_modelfile_renders_back_to_the_same_instructions():
    text = (
        '# a comment\nfrom tiny-b\nSYSTEM """You are\na pirate."""\nTEMPLATE {{ .Prompt }}\n'
        'PARAMETER temperature 0.5\nPARAMETER stop "<|im_end|>"\nPARAMETER stop END\nPARAMETER num_ctx 64\n'
        'PARAMETER penalize_newline true\nMESSAGE user hi there\nMESSAGE assistant """ahoy"""\nLICENSE MIT\n'
    )
    parsed = mf.parse(text)
    assert parsed.base == "tiny-b" and parsed.system == "You are\na pirate." and parsed.template == "{{ .Prompt }}"
    assert parsed.parameters == {"temperature": 0.5, "stop": ["<|im_end|>", "END"], "num_ctx": 64,
                                 "penalize_newline": True}  # fmt: skip
    assert parsed.messages == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "ahoy"}]
    assert parsed.license == "MIT"
    assert mf.parse(mf.render(parsed, "header\nlines")) == parsed
    tricky = mf.Modelfile(base="x", system='a """ b', parameters={"stop": ["#", " "]})
    assert mf.parse(mf.render(tricky)) == tricky
    assert mf.parameters_text({"stop": ["a", "b"], "top_k": 4}).splitlines()[0].split() == ["stop", '"a"']


@pytest.mark.parametrize(
    ("text", "message"),
    [("BOGUS x", "unknown instruction"), ('SYSTEM """never closed', "never closed"), ("MESSAGE robot hi", "role"),
     ("PARAMETER", "needs a name"), ("FROM", "no value")],
)  # fmt: skip
def test_a_broken_modelfile_says_where(text, message):
    with pytest.raises(mf.ModelfileError, match=message):
        mf.parse(text)


# --- the registry's additions ------------------------------------------------------------------------------------


def _upload(registry: Registry, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    partial = registry.blob_path(digest).with_name("upload-partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(data)
    registry.adopt_blob(partial, digest)
    assert not partial.exists()
    return digest


def test_uploaded_blobs_register_as_a_gguf_or_a_directory(tmp_path, tiny_model_factory):
    registry = Registry(tmp_path / "cache")
    write_tiny_gguf(tmp_path / "t.gguf")
    digest = _upload(registry, (tmp_path / "t.gguf").read_bytes())
    assert _upload(registry, (tmp_path / "t.gguf").read_bytes()) == digest  # a second upload keeps the first blob
    made = registry.import_blobs("up", {"t.gguf": digest}, system="S", parameters={"top_k": 3})
    assert (made.format, made.digest, made.system, made.parameters) == ("gguf", digest, "S", {"top_k": 3})
    assert made.family == "llama" and made.template and registry.get("up") == made
    folder = tiny_model_factory("llama", seed=1)
    files = {p.name: _upload(registry, p.read_bytes()) for p in folder.iterdir() if p.is_file()}
    directory = registry.import_blobs("dir", files)
    assert directory.format == "safetensors" and directory.parameter_count > 0
    with pytest.raises(RegistryError, match="not in the store"):
        registry.import_blobs("x", {"m.gguf": "sha256:" + "0" * 64})
    with pytest.raises(RegistryError, match="one .gguf"):
        registry.import_blobs("x", {"a.gguf": digest, "config.json": files["config.json"]})
    with pytest.raises(ValueError):
        registry.import_blobs("x", {"../m.gguf": digest})
    with pytest.raises(RegistryError, match="only from the blobs"):
        registry.adopt_blob(tmp_path / "t.gguf", digest)
    assert registry.find("x") is None


def test_extras_keep_a_licence_and_messages(tmp_path):
    registry = Registry(tmp_path / "cache")
    assert registry.extras("m") == {}
    registry.set_extras("m", license="MIT", messages=[{"role": "user", "content": "hi"}])
    assert registry.extras("M:latest") == {"license": "MIT", "messages": [{"role": "user", "content": "hi"}]}
    registry.set_extras("m")
    assert registry.extras("m") == {} and not list((tmp_path / "cache" / "registry" / "extras").iterdir())


# --- routes in process -------------------------------------------------------------------------------------------


def _local_app(management: bool = True) -> TestClient:
    state = SimpleNamespace(models=None, model_management=management, payload_limit=2_000_000)
    app = Starlette(routes=library.routes(state))
    app.state.ember = state
    return TestClient(app)


def test_root_answers_as_ollama_does():
    client = _local_app()
    r = client.get("/")
    assert r.status_code == 200 and r.text == "Ollama is running" and r.headers["content-type"].startswith("text/plain")
    assert client.head("/").status_code == 200
    version = client.get("/api/version").json()
    assert version["version"] == library.OLLAMA_API_VERSION and version["ember_version"]


def test_management_routes_refuse_when_disabled():
    client = _local_app(management=False)
    for method, path, body in (
        ("POST", "/api/pull", {"model": "x"}),
        ("POST", "/api/push", {"model": "x"}),
        ("POST", "/api/create", {"model": "x", "from": "y"}),
        ("POST", "/api/copy", {"source": "x", "destination": "y"}),
        ("DELETE", "/api/delete", {"model": "x"}),
        ("POST", "/api/blobs/sha256:" + "0" * 64, None),
    ):
        r = client.request(method, path, json=body) if body is not None else client.request(method, path, content=b"x")
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert "--disable-model-management" in r.json()["error"]
    assert client.get("/api/tags").json() == {"models": []}  # reading is unaffected


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tiny_model_factory, tmp_path_factory):
    """A loopback Hub: `tester/tiny-gguf` (a GGUF repository) and `tester/tiny-d` (safetensors)."""
    root = tmp_path_factory.mktemp("hub")
    (root / "tester" / "tiny-gguf").mkdir(parents=True)
    write_tiny_gguf(root / "tester" / "tiny-gguf" / "tiny-F32.gguf")
    shutil.copytree(tiny_model_factory("llama", seed=3), root / "tester" / "tiny-d")
    shutil.copytree(tiny_model_factory("llama", seed=4), root / "tester" / "tiny-e")
    with HubServer(root) as running:
        yield running


@pytest.fixture(scope="module")
def server(tiny_model_factory, tiny_llama_dir, tmp_path_factory, hub):
    tmp = tmp_path_factory.mktemp("ollama")
    Registry(tmp / "cache").import_path("tiny-b", tiny_model_factory("llama", seed=1))
    port = free_port()
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "", "HF_HUB_OFFLINE": ""}
    launcher = Launcher(*launcher_args(tiny_llama_dir, tmp, port, "--keep-alive", "10m"), env=env)
    try:
        launcher.wait_for_line("[launcher] serving ", timeout=240)
        url = f"http://127.0.0.1:{port}"
        yield SimpleNamespace(url=url, tmp=tmp, client=ollama.Client(host=url, timeout=240))
    finally:
        launcher.kill()


def _complete(url: str, model: str) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 3}, timeout=240)
    assert r.status_code == 200, r.text
    return r.json()


def _blobs(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "cache" / "blobs").iterdir())


def test_root_on_the_server(server):
    root = httpx.get(server.url + "/")
    if root.text != "Ollama is running":
        pytest.skip("app.py's GET / (health) still shadows Ollama's; test_root_answers_as_ollama_does covers it")
    assert httpx.head(server.url + "/").status_code == 200


def test_tags_show_and_ps(server, tiny_model_factory):
    url, client = server.url, server.client
    hidden = json.loads((tiny_model_factory("llama", seed=1) / "config.json").read_text())["hidden_size"]
    tags = httpx.get(url + "/api/tags").json()
    check(tags, "ListResponse")
    listed = {m["name"]: m for m in tags["models"]}
    assert listed["tiny-b:latest"]["details"]["format"] == "safetensors" and len(listed) == 2
    entry = listed["tiny-b:latest"]
    assert len(entry["digest"]) == 64 and entry["size"] > 0 and entry["details"]["parameter_size"]
    assert client.list().models[0].model  # the official client reads it

    shown = client.show("tiny-b")
    raw = httpx.post(url + "/api/show", json={"model": "tiny-b"}).json()
    check(raw, "ShowResponse")
    assert raw["model_info"]["general.architecture"] == "llama" and raw["capabilities"][0] == "completion"
    assert raw["model_info"]["llama.embedding_length"] == hidden and raw["model_info"]["general.parameter_count"] > 0
    assert mf.parse(shown.modelfile).base == "tiny-b:latest" and shown.details.family == "llama"
    missing = httpx.post(url + "/api/show", json={"model": "nope"})
    assert missing.status_code == 404 and missing.json() == {"error": "model 'nope' not found"}

    _complete(url, "tiny-b")
    ps = httpx.get(url + "/api/ps").json()
    check(ps, "ProcessResponse")
    running = {m["name"]: m for m in ps["models"]}
    assert "tiny-b:latest" in running and len(running) == 2
    b = running["tiny-b:latest"]
    assert b["size"] > 0 and b["size_vram"] == 0 and b["context_length"] == 256 and b["digest"] == entry["digest"]
    assert client.ps().models[0].expires_at is not None
    from datetime import datetime, timedelta

    expires = datetime.fromisoformat(b["expires_at"].replace("Z", "+00:00")[:26] + "+00:00")
    now = datetime.now(expires.tzinfo)
    assert timedelta(minutes=8) < expires - now <= timedelta(minutes=10, seconds=5)
    shown_loaded = httpx.post(url + "/api/show", json={"model": "tiny-b"}).json()
    assert shown_loaded["model_info"]["llama.embedding_length"] == hidden  # from the loaded shard now


def test_create_from_a_modelfile_and_show_it_back(server):
    url, client = server.url, server.client
    text = 'FROM tiny-b\nSYSTEM """You are a pirate."""\nPARAMETER temperature 0.5\nPARAMETER stop "END"\n'
    text += "MESSAGE user ahoy\nLICENSE MIT\n"
    r = httpx.post(url + "/api/create", json={"model": "pirate", "modelfile": text}, timeout=60)
    assert r.status_code == 200, r.text
    statuses = [json.loads(x) for x in r.text.splitlines()]
    for status in statuses:
        check(status, "ProgressResponse")
    assert statuses[0] == {"status": "parsing modelfile"} and statuses[-1] == {"status": "success"}
    assert {"status": "writing manifest"} in statuses
    shown = httpx.post(url + "/api/show", json={"model": "pirate"}).json()
    again = mf.parse(shown["modelfile"])
    assert again == mf.Modelfile(
        base="tiny-b:latest",
        template=again.template,
        system="You are a pirate.",
        license="MIT",
        parameters={"temperature": 0.5, "stop": ["END"]},
        messages=[{"role": "user", "content": "ahoy"}],
    )
    assert shown["details"]["parent_model"] == "tiny-b:latest" and shown["system"] == "You are a pirate."
    assert shown["parameters"].split() == ["stop", '"END"', "temperature", "0.5"] and shown["license"] == "MIT"
    # The shown Modelfile is accepted back, and today's form (from, system, parameters) through the client.
    assert client.create(model="pirate2", from_="pirate", system="Arr.", stream=False).status == "success"
    r = httpx.post(url + "/api/create", json={"model": "pirate3", "modelfile": shown["modelfile"], "stream": False})
    assert r.json() == {"status": "success"}
    third = client.show("pirate3")
    assert third.modelfile.replace("pirate3", "pirate") == shown["modelfile"] and third.license == "MIT"
    assert client.show("pirate2").modelinfo is not None and "Arr." in client.show("pirate2").modelfile
    assert _complete(url, "pirate")["model"] == "pirate:latest"
    # Refusals: a server path, an unknown base, a quantization Ember does not run, no source.
    for body, status, words in (
        ({"model": "p", "path": "/etc/Modelfile"}, 400, "path"),
        ({"model": "p", "from": "nope", "stream": False}, 404, "nope"),
        ({"model": "p", "from": "tiny-b", "quantize": "q5_K_M"}, 400, "quantize"),
        ({"model": "p"}, 400, "from"),
        ({"model": "p", "modelfile": "BOGUS x"}, 400, "unknown instruction"),
    ):
        r = httpx.post(url + "/api/create", json=body, timeout=60)
        assert r.status_code == status and words in r.json()["error"], (body, r.status_code, r.text)
    streamed = httpx.post(url + "/api/create", json={"model": "p", "from": "nope"}, timeout=60)
    assert streamed.status_code == 404  # refused before the stream begins
    assert client.show("pirate").license == "MIT"


def test_create_from_an_uploaded_gguf_then_generate(server, tmp_path):
    url, client = server.url, server.client
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert httpx.head(url + f"/api/blobs/{digest}").status_code == 404
    assert client.create_blob(path) == digest
    assert httpx.head(url + f"/api/blobs/{digest}").status_code == 200
    assert httpx.head(url + f"/api/blobs/sha256-{digest[7:]}").status_code == 200
    lines = list(client.create(model="uploaded", files={"tiny.gguf": digest}, stream=True))
    assert lines[0].status == "parsing modelfile" and lines[-1].status == "success"
    shown = client.show("uploaded")
    assert shown.details.format == "gguf" and shown.details.quantization_level == "F32"
    assert _complete(url, "uploaded")["model"] == "uploaded:latest"
    # A body whose digest is not the path's: 400 and nothing kept; a malformed digest: 400.
    before = _blobs(server.tmp)
    wrong = "sha256:" + "0" * 64
    r = httpx.post(url + f"/api/blobs/{wrong}", content=b"not those bytes")
    assert r.status_code == 400 and "mismatch" in r.json()["error"]
    for bad in ("sha256:abc", "md5:" + "0" * 64, "..%2F..%2Fetc", "sha256:" + "G" * 64):
        assert httpx.post(url + f"/api/blobs/{bad}", content=b"x").status_code in (400, 404), bad
        assert httpx.head(url + f"/api/blobs/{bad}").status_code in (400, 404), bad
    assert _blobs(server.tmp) == before
    r = httpx.post(url + "/api/create", json={"model": "u2", "files": {"m.gguf": wrong}, "stream": False})
    assert r.status_code == 400 and "upload" in r.json()["error"]


def test_create_from_a_name_not_here_pulls_it_first(server):
    url, client = server.url, server.client
    lines = [line.status for line in client.create(model="derived-e", from_="tester/tiny-e", system="Hi.", stream=True)]
    assert lines[:2] == ["parsing modelfile", "pulling tester/tiny-e:latest"] and lines[-1] == "success"
    names = {m.model for m in client.list().models}
    assert {"tester/tiny-e:latest", "derived-e:latest"} <= names
    assert client.show("derived-e").details.parent_model == "tester/tiny-e:latest"
    r = httpx.post(url + "/api/create", json={"model": "x", "from": "tester/none", "stream": False}, timeout=120)
    assert r.status_code >= 400 and "tester/none" in r.json()["error"]
    assert "x:latest" not in {m.model for m in client.list().models}


def test_pull_streams_progress_in_order(server, hub):
    url, client = server.url, server.client
    lines = list(client.pull("tester/tiny-d", stream=True))
    statuses = [line.status for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == [
        "verifying sha256 digest", "writing manifest", "success"]  # fmt: skip
    pulling = [line for line in lines if line.status.startswith("pulling ") and line.status != "pulling manifest"]
    assert pulling and any(line.completed and line.total for line in pulling)
    raw = httpx.post(url + "/api/pull", json={"model": "hf.co/tester/tiny-gguf"}, timeout=240)
    records = [json.loads(x) for x in raw.text.splitlines()]
    for record in records:
        check(record, "ProgressResponse")
    # A Hub file's digest is known only once it is downloaded: its progress lines carry counts, not a digest.
    layers = [r for r in records if r["status"].startswith("pulling ") and r["status"] != "pulling manifest"]
    assert layers and layers[-1]["completed"] == layers[-1]["total"] > 0 and records[-1] == {"status": "success"}
    names = {m.model for m in client.list().models}
    assert {"tester/tiny-d:latest", "hf.co/tester/tiny-gguf:latest"} <= names
    assert client.pull("tester/tiny-d", stream=False).status == "success"  # already here: success at once
    before = sorted(p.name for p in (server.tmp / "cache" / "registry" / "manifests").iterdir())
    for name, status in (("nosuchmodel", 404), ("hf.co/tester/none", 404)):
        r = httpx.post(url + "/api/pull", json={"model": name}, timeout=120)
        assert r.status_code == status and r.json()["error"], (name, r.status_code, r.text)
    assert sorted(p.name for p in (server.tmp / "cache" / "registry" / "manifests").iterdir()) == before
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("nosuchmodel")
    assert caught.value.status_code == 404


def test_copy_delete_and_push(server):
    url, client = server.url, server.client
    assert client.copy("tiny-b", "tiny-b-copy").status == "success"
    assert client.show("tiny-b-copy").details.format == "safetensors"
    r = httpx.post(url + "/api/copy", json={"source": "nope", "destination": "x"})
    assert r.status_code == 404 and r.json()["error"] == "model 'nope' not found"
    assert httpx.request("DELETE", url + "/api/delete", json={"model": "tiny-b-copy"}).status_code == 200
    r = httpx.request("DELETE", url + "/api/delete", json={"name": "tiny-b-copy"})  # the older field
    assert r.status_code == 404
    default = httpx.get(url + "/api/tags").json()["models"][0]["name"]
    r = httpx.request("DELETE", url + "/api/delete", json={"model": default})
    assert r.status_code == 409 and "default model" in r.json()["error"]
    # Deleting the last name of loaded weights unloads them.
    client.copy("tester/tiny-d", "only-d")
    _complete(url, "only-d")
    assert "only-d:latest" in groups(server.tmp) or "tester/tiny-d:latest" in groups(server.tmp)
    client.delete("tester/tiny-d")
    assert client.delete("only-d").status == "success"
    assert not {"only-d:latest", "tester/tiny-d:latest"} & set(groups(server.tmp))
    r = httpx.post(url + "/api/push", json={"model": "tiny-b"})
    assert r.status_code == 501 and "push" in r.json()["error"]


def test_bad_names_are_refused_everywhere(server):
    url = server.url
    store_before = sorted(p.name for p in server.tmp.iterdir())
    cache_before = sorted(p.name for p in (server.tmp / "cache").iterdir())
    for bad in BAD_NAMES:
        for method, path, body in (
            ("POST", "/api/show", {"model": bad}),
            ("POST", "/api/pull", {"model": bad, "stream": False}),
            ("POST", "/api/push", {"model": bad}),
            ("POST", "/api/create", {"model": bad, "from": "tiny-b"}),
            ("POST", "/api/create", {"model": "fine", "from": bad}),
            ("POST", "/api/copy", {"source": bad, "destination": "fine"}),
            ("POST", "/api/copy", {"source": "tiny-b", "destination": bad}),
            ("DELETE", "/api/delete", {"model": bad}),
        ):
            r = httpx.request(method, url + path, json=body, timeout=60)
            assert 400 <= r.status_code < 500, (method, path, bad, r.status_code, r.text)
            assert r.json()["error"]
    assert (
        httpx.post(
            url + "/api/create", json={"model": "fine", "files": {"../m.gguf": "sha256:" + "0" * 64}}
        ).status_code
        == 400
    )
    assert sorted(p.name for p in server.tmp.iterdir()) == store_before
    assert sorted(p.name for p in (server.tmp / "cache").iterdir()) == cache_before
    assert (
        server.client.show("tiny-b").details is not None
        and httpx.post(url + "/api/show", json={"model": "fine"}).status_code == 404
    )
