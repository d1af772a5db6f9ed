"""Many models in one server, over real processes: a launcher with a tiny default model and two more
tiny models in its registry (one derived), called by name through the OpenAI client and Jan's routes.

Covers load on demand, failure isolation (SIGKILL of an on-demand model's shard while a stream runs:
that stream ends with an error, the default model serves throughout, the next request reloads it),
keep_alive from the server flag, Jan's start/stop/delete, eviction by --max-loaded-models, and
names that must not reach the filesystem.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from hub_server import HubServer
from servers import Launcher, control_client, free_port, wait_for
from test_jan_routes import check

from ember.proto import control_pb2 as cpb
from ember.registry import Registry

pytestmark = pytest.mark.timeout(600)


def launcher_args(default_dir: Path, tmp: Path, port: int, *extra: str) -> list[str]:
    return [
        "--model-id",
        str(default_dir),
        "--shard-uds-path",
        str(tmp / "s"),
        "--cache-dir",
        str(tmp / "cache"),
        "--port",
        str(port),
        "--hostname",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "--max-batch-prefill-tokens",
        "256",
        "--max-total-tokens",
        "256",
        "--max-input-tokens",
        "128",
        "--kv-cache-bytes",
        "4000000",
        "--prefill-chunk-tokens",
        "64",
        *extra,
    ]


@pytest.fixture(scope="module")
def library(tiny_model_factory, tmp_path_factory):
    """A store holding `tiny-b` (other weights than the default) and `pirate`, derived from it."""
    tmp = tmp_path_factory.mktemp("multi")
    registry = Registry(tmp / "cache")
    registry.import_path("tiny-b", tiny_model_factory("llama", seed=1))
    registry.create("pirate", "tiny-b", system="You are a pirate.", parameters={"temperature": 0.5})
    return tmp


@pytest.fixture(scope="module")
def hub(tiny_model_factory, tmp_path_factory):
    """A loopback Hugging Face Hub serving `tester/tiny-d`, a safetensors repository."""
    root = tmp_path_factory.mktemp("hub")
    shutil.copytree(tiny_model_factory("llama", seed=3), root / "tester" / "tiny-d")
    with HubServer(root) as running:
        yield running


@pytest.fixture(scope="module")
def server(library, tiny_llama_dir, hub):
    port = free_port()
    hub_env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "", "HF_HUB_OFFLINE": ""}
    launcher = Launcher(*launcher_args(tiny_llama_dir, library, port, "--keep-alive", "-1"), env=hub_env)
    try:
        launcher.wait_for_line("[launcher] serving ", timeout=240)
        yield launcher, f"http://127.0.0.1:{port}", library
    finally:
        launcher.kill()


def groups(tmp: Path) -> dict[str, cpb.Group]:
    with control_client(f"{tmp / 's'}-control") as stub:
        return {g.name: g for g in stub.List(cpb.ListRequest(), timeout=10).groups}


def router_dropped_it(url: str, model: str) -> None:
    """Wait until the router has taken the launcher's word that `model` failed: requests that raced the
    failure fail with it; the ones after it load the model again."""
    wait_for(lambda: httpx.get(f"{url}/v1/models/{model}").json()["state"] != "running", 30, f"{model} dropped")


def complete(url: str, model: str, **kw) -> openai.types.Completion:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=240)
    return client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, **kw)


def test_a_named_model_loads_on_demand_and_derived_names_share_its_group(server):
    launcher, url, tmp = server
    listing = httpx.get(url + "/v1/models").json()
    states = {m["id"]: m["state"] for m in listing["data"]}
    assert states["tiny-b:latest"] in ("downloaded", "stopped") and states["pirate:latest"] == states["tiny-b:latest"]
    answer = complete(url, "tiny-b")
    assert answer.model == "tiny-b:latest" and answer.choices[0].text
    assert httpx.get(url + "/v1/models/tiny-b").json()["state"] == "running"
    before = {name: list(g.pids) for name, g in groups(tmp).items()}
    assert complete(url, "pirate").model == "pirate:latest"  # the same weights: no second group
    after = {name: list(g.pids) for name, g in groups(tmp).items()}
    assert after == before and len(after) == 2
    card = httpx.get(url + "/v1/models/pirate").json()
    check(card, "GetModelResponse")
    assert card["state"] == "running" and card["parameters"] == {"temperature": "0.5"}
    # TGI's routes keep serving the default model.
    r = httpx.post(url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 200
    # OpenAI's routes fall back to the default model for an unknown name, as TGI's do.
    fallback = complete(url, "gpt-4o")
    assert fallback.model == listing["data"][0]["id"] and len(groups(tmp)) == 2


def test_a_hub_repository_downloads_in_the_background_then_serves(server, hub):
    launcher, url, tmp = server
    assert httpx.get(url + "/v1/models/tester/tiny-d").status_code == 404  # not downloaded, not in the catalog
    r = httpx.post(url + "/v1/models", json={"model": "tester/tiny-d"})
    assert r.status_code == 200, r.text
    check(r.json(), "DownloadModelResponse")
    assert r.json() == {"id": "tester/tiny-d:latest", "object": "model", "state": "downloading"}

    def downloaded():
        card = httpx.get(url + "/v1/models/tester%2Ftiny-d").json()
        assert not card.get("download", {}).get("error"), card
        return card if card["state"] == "downloaded" else None

    card = wait_for(downloaded, 120, "the download")
    check(card, "GetModelResponse")
    assert card["source_url"] == "https://huggingface.co/tester/tiny-d" and card["format"] == "safetensors"
    assert any(req.path.endswith("model.safetensors") for req in hub.requests)
    # Asking again downloads nothing more, and the model serves by name.
    again = httpx.get(url + "/v1/models/download/tester/tiny-d")
    assert again.json()["state"] == "downloaded"
    assert complete(url, "tester/tiny-d").model == "tester/tiny-d:latest"


def test_a_dead_on_demand_model_fails_alone_and_reloads(server):
    launcher, url, tmp = server
    complete(url, "tiny-b")
    victim = groups(tmp)["tiny-b:latest"]
    outcome: dict = {}

    def stream() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        try:
            events = client.completions.create(
                model="tiny-b", prompt="Hello", max_tokens=200, stream=True, extra_body={"ignore_eos": True}
            )
            for _ in events:
                outcome["tokens"] = outcome.get("tokens", 0) + 1
                if outcome["tokens"] == 2:
                    started.set()
            outcome["ended"] = "normally"
        except openai.APIError as exc:
            outcome["ended"] = f"error: {exc}"
        finally:
            started.set()

    started = threading.Event()
    worker = threading.Thread(target=stream)
    worker.start()
    assert started.wait(120)
    os.kill(victim.pids[0], signal.SIGKILL)
    worker.join(60)
    assert not worker.is_alive(), "the stream hung after its model died"
    assert outcome["ended"].startswith("error"), outcome
    # The default model served throughout, and the launcher lives.
    assert complete(url, "tiny").choices[0].text is not None
    assert launcher.proc.poll() is None
    failed = wait_for(lambda: groups(tmp)["tiny-b:latest"].state == cpb.GROUP_STATE_FAILED, 30, "FAILED")
    assert failed and "died" in groups(tmp)["tiny-b:latest"].reason
    router_dropped_it(url, "tiny-b")
    # The next request loads it again, on new processes.
    assert complete(url, "tiny-b").model == "tiny-b:latest"
    reloaded = groups(tmp)["tiny-b:latest"]
    assert reloaded.state == cpb.GROUP_STATE_READY and set(reloaded.pids).isdisjoint(victim.pids)


def test_jan_stop_start_and_bad_names(server):
    launcher, url, tmp = server
    complete(url, "tiny-b")
    stopped = httpx.put(url + "/v1/models/tiny-b/stop", timeout=60)
    assert stopped.json() == {"id": "tiny-b:latest", "object": "model", "state": "stopped"}
    assert "tiny-b:latest" not in groups(tmp)
    assert httpx.put(url + "/v1/models/tiny-b/stop").json()["state"] == "stopped"  # idempotent
    assert httpx.get(url + "/v1/models/tiny-b").json()["state"] == "stopped"
    started = httpx.put(url + "/v1/models/tiny-b/start", timeout=240)
    assert started.json() == {"id": "tiny-b:latest", "object": "model", "state": "running"}
    assert "tiny-b:latest" in groups(tmp)
    store_before = sorted(p.name for p in tmp.iterdir())
    for bad in ("..%2F..%2Fetc", "%2Fetc%2Fpasswd", "a%00b", "x" * 300, "caf%C3%A9"):
        for method, path in (
            ("GET", f"/v1/models/{bad}"),
            ("PUT", f"/v1/models/{bad}/start"),
            ("PUT", f"/v1/models/{bad}/stop"),
            ("DELETE", f"/v1/models/{bad}"),
            ("GET", f"/v1/models/download/{bad}"),
        ):
            r = httpx.request(method, url + path, timeout=30)
            assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
            assert r.json()["error"]["message"]
        r = httpx.post(url + "/v1/models", json={"model": bad.replace("%2F", "/").replace("%00", "\0")}, timeout=30)
        assert 400 <= r.status_code < 500, r.text
    assert sorted(p.name for p in tmp.iterdir()) == store_before


def test_ollama_loads_with_an_empty_prompt_and_unloads_with_keep_alive_zero(server):
    """Ollama's explicit load and unload on a launcher, and a request's keep_alive, on an on-demand model."""
    import ollama

    launcher, url, tmp = server
    client = ollama.Client(host=url)
    httpx.put(url + "/v1/models/tiny-b/stop", timeout=60)
    loaded = client.generate(model="tiny-b", prompt="")
    assert loaded.done and loaded.done_reason == "load" and "tiny-b:latest" in groups(tmp)
    answer = client.chat(model="pirate", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 3})
    assert answer.done and answer.eval_count <= 3
    unloaded = client.generate(model="tiny-b", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload" and "tiny-b:latest" not in groups(tmp)
    # A request's keep_alive: 0 unloads once it ends; the default model is untouched by any of it.
    client.generate(model="tiny-b", prompt="Hello", options={"num_predict": 2}, keep_alive=0)
    wait_for(lambda: "tiny-b:latest" not in groups(tmp), 30, "tiny-b to unload after its keep_alive 0 request")
    assert any(g.default for g in groups(tmp).values())
    with pytest.raises(ollama.ResponseError) as missing:
        client.generate(model="nope", prompt="x")
    assert missing.value.status_code == 404 and "model 'nope' not found" in str(missing.value)


def test_a_chat_ui_flow_with_the_ollama_client(server):
    """What Open WebUI and the like do: list, show, stream a chat with a system prompt, then look at ps."""
    import ollama

    launcher, url, tmp = server
    client = ollama.Client(host=url)
    assert httpx.get(url + "/").text == "Ollama is running"
    names = [m.model for m in client.list().models]
    assert "tiny-b:latest" in names and "pirate:latest" in names
    shown = client.show("pirate")
    assert "SYSTEM" in shown.modelfile and "You are a pirate." in shown.modelfile
    assert httpx.post(url + "/api/show", json={"model": "pirate"}).json()["system"] == "You are a pirate."
    pieces = list(
        client.chat(
            model="tiny-b",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
            stream=True,
            options={"num_predict": 4, "temperature": 0},
            keep_alive="10m",
        )
    )
    assert pieces[-1].done and all(not p.done for p in pieces[:-1]) and pieces[-1].eval_count >= 1
    running = {m.model: m for m in client.ps().models}
    assert "tiny-b:latest" in running
    expires = running["tiny-b:latest"].expires_at
    assert expires is not None and 500 < (expires.timestamp() - time.time()) <= 600


def test_an_ollama_stream_whose_model_dies_ends_with_an_error_line(server):
    import ollama

    launcher, url, tmp = server
    client = ollama.Client(host=url, timeout=120)
    client.generate(model="tiny-b", prompt="", keep_alive=-1)
    victim = groups(tmp)["tiny-b:latest"]
    stream = client.generate(model="tiny-b", prompt="Hello", stream=True, options={"num_predict": 200})
    first = next(stream)
    assert not first.done
    os.kill(victim.pids[0], signal.SIGKILL)
    try:
        with pytest.raises(ollama.ResponseError):
            for _ in stream:
                pass
    except BaseException:
        print("\n".join(launcher.output()[-60:]))
        raise
    router_dropped_it(url, "tiny-b")
    assert client.generate(model="tiny-b", prompt="Hi", options={"num_predict": 2}).done  # loaded again


def test_a_model_created_with_quantize_runs_as_its_own_group_at_that_precision(server):
    """Ollama's create `quantize`: the same weights, served by another shard group at --quantize int8."""
    launcher, url, tmp = server
    body = {"model": "tiny-b-q8", "from": "tiny-b", "quantize": "q8_0", "stream": False}
    r = httpx.post(url + "/api/create", json=body, timeout=60)
    assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
    complete(url, "tiny-b")
    assert complete(url, "tiny-b-q8").model == "tiny-b-q8:latest"
    loaded = groups(tmp)
    plain, quantized = loaded["tiny-b:latest"], loaded["tiny-b-q8:latest"]
    assert quantized.group == plain.group + "-int8" and set(quantized.pids).isdisjoint(plain.pids)
    assert any("precision int8" in line for line in launcher.output())
    assert httpx.request("DELETE", url + "/api/delete", json={"model": "tiny-b-q8"}, timeout=60).status_code == 200
    wait_for(lambda: "tiny-b-q8:latest" not in groups(tmp), 30, "the int8 group to unload with its last name")


def test_the_default_model_can_be_stopped_and_comes_back(server):
    launcher, url, tmp = server
    default = next(name for name, g in groups(tmp).items() if g.default)
    listing = httpx.get(url + "/v1/models").json()["data"]
    default_id = listing[0]["id"]
    r = httpx.put(url + f"/v1/models/{default_id.replace('/', '%2F')}/stop", timeout=60)
    assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
    assert default not in groups(tmp)
    assert httpx.get(url + "/health").status_code == 200  # the server can still serve
    r = httpx.post(url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, timeout=240)
    assert r.status_code == 200, r.text
    assert any(g.default for g in groups(tmp).values())


def test_delete_unloads_and_forgets(server):
    launcher, url, tmp = server
    complete(url, "pirate")
    r = httpx.delete(url + "/v1/models/pirate", timeout=60)
    assert r.json() == {"id": "pirate:latest", "object": "model", "deleted": True}
    check(r.json(), "DeleteModelResponse")
    assert "tiny-b:latest" in groups(tmp), "tiny-b still names those weights: they stay loaded"
    assert httpx.get(url + "/v1/models/pirate").status_code == 404
    r = httpx.post(url + "/v1/completions", json={"model": "pirate", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] != "pirate:latest"  # OpenAI: the default model


def test_keep_alive_and_max_loaded_models(library, tiny_llama_dir, tiny_model_factory):
    """A second server on the same store: --keep-alive 1s unloads an idle model; with --max-loaded-models 2,
    loading another model evicts an idle one (here one Jan started, which has no timer), never the default."""
    Registry(library / "cache").import_path("tiny-c", tiny_model_factory("llama", seed=2))
    port = free_port()
    args = launcher_args(
        tiny_llama_dir,
        library / "second",
        port,
        "--keep-alive",
        "1s",
        "--max-loaded-models",
        "2",
        "--preload",
        "tiny-b",
    )
    (library / "second").mkdir(exist_ok=True)
    args[args.index("--cache-dir") + 1] = str(library / "cache")
    launcher = Launcher(*args)
    url = f"http://127.0.0.1:{port}"
    tmp = library / "second"
    try:
        launcher.wait_for_line("[launcher] serving ", timeout=240)
        assert "tiny-b:latest" in groups(tmp), "--preload loads it before the server answers"
        complete(url, "tiny-b")
        wait_for(lambda: "tiny-b:latest" not in groups(tmp), 30, "tiny-b to expire after 1 s idle")
        assert httpx.get(url + "/v1/models/tiny-b").json()["state"] == "stopped"
        # Eviction: with room for two, loading tiny-c unloads the idle tiny-b, never the default.
        assert httpx.put(url + "/v1/models/tiny-b/start", timeout=240).json()["state"] == "running"
        complete(url, "tiny-c")
        loaded = groups(tmp)
        assert "tiny-c:latest" in loaded and any(g.default for g in loaded.values()) and len(loaded) == 2
        metrics = httpx.get(url + "/metrics").text
        assert 'ember_model_evictions{model="tiny-b:latest"} 1' in metrics
        assert "ember_model_load_duration_count" in metrics and 'tgi_request_count{model="tiny-c:latest"}' in metrics
    finally:
        launcher.kill()
