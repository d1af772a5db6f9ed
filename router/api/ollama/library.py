"""Ollama's library routes on Ember's registry: GET/HEAD /, /api/version, /api/tags, /api/show, /api/ps,
/api/pull, /api/push, /api/create, /api/copy, /api/delete, /api/blobs/{digest}.

Names go through `ember.model_names` before anything else sees them (a bad one is a 400 with the rule
it broke), digests through `ember.registry.digest_hex`, so nothing a request sends builds a path outside
the store. Routes that change the library call `check_management` (403 with
--disable-model-management); the app asks for the API key on their prefixes.

Pulls and imports run the registry's blocking calls on worker threads; a client that goes away does not
stop them, and the registry never leaves half an entry behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from ember import __version__
from ember.model_names import ModelNameError
from ember.model_names import parse as parse_name
from ember.router.api.ollama import modelfile as mf
from ember.router.api.ollama.common import body_of, created_at, error_line, line, ndjson, ollama_error, stream_flag
from ember.router.errors import BodyError, EmberError, PayloadTooLarge
from ember.router.models import ModelNotFound, Models, Served, check_management

if TYPE_CHECKING:
    from ember.router.app import AppState

log = logging.getLogger("ember.router.ollama")

OLLAMA_API_VERSION = "0.6.5"
"""The Ollama release whose API these routes follow (what clients compare `/api/version` against)."""
MAX_BLOB_BYTES = 64 << 30
"""The largest upload /api/blobs takes: a GGUF is far beyond the JSON payload limit, so it has its own."""
NO_EXPIRY_S = 292 * 365.25 * 86400
"""Ollama shows a model kept forever as expiring this far ahead (Go's largest duration, about 292 years)."""
PROGRESS_STEP = 0.01
"""Pull progress lines are sent when the share done moves by this much (and at each stage change)."""
PROGRESS_STAGES = ("download", "extract", "copy")
VERIFY_STAGES = ("hash", "verify")


class Conflict(EmberError):
    status = 409
    error_type = "conflict"


class NotImplementedHere(EmberError):
    status = 501
    error_type = "not_implemented"


class StoreError(EmberError):
    status = 500
    error_type = "registry"


_RUNNING: set[asyncio.Task] = set()


def _background(work: Callable[[], None]) -> None:
    """Run `work` on a worker thread to its end, whether or not the client that asked stays."""
    task = asyncio.ensure_future(asyncio.to_thread(work))
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


# --- names, manifests, details ------------------------------------------------------------


def _display(name: str) -> str:
    try:
        return parse_name(name).display
    except ModelNameError as exc:
        raise BodyError(str(exc)) from None


def _models(request: Request) -> Models:
    state: AppState = request.app.state.ember
    if state.models is None:
        raise NotImplementedHere("this server has no model library")
    return state.models


def _registry(request: Request) -> Any:
    registry = _models(request).registry
    if registry is None:
        raise NotImplementedHere("this server has no model library: it runs without a launcher (ember-launcher)")
    return registry


def _find(registry: Any, name: str) -> Any:
    try:
        return registry.find(name) if registry is not None else None
    except ModelNameError as exc:
        raise BodyError(str(exc)) from None


def _quiet_find(registry: Any, name: str) -> Any:
    """The manifest of a served model's name, None for a name that is a path (a default model given as one)."""
    try:
        return _find(registry, name)
    except EmberError:
        return None


def _required(registry: Any, name: str) -> Any:
    manifest = _find(registry, name)
    if manifest is None:
        raise ModelNotFound(name)
    return manifest


def details(manifest: Any, shard_info: dict | None = None) -> dict[str, Any]:
    """Ollama's ModelDetails (strings and a list, never null)."""
    if manifest is None:
        info = shard_info or {}
        family = str(info.get("model_type") or "")
        return {
            "parent_model": "",
            "format": "safetensors",
            "family": family,
            "families": [family] if family else [],
            "parameter_size": "",
            "quantization_level": str(info.get("precision") or ""),
        }
    family = str(manifest.family or manifest.architecture or "")
    return {
        "parent_model": manifest.base or "",
        "format": manifest.format,
        "family": family,
        "families": [family] if family else [],
        "parameter_size": manifest.parameter_size,
        "quantization_level": str(manifest.quantization or ""),
    }


def _hex(digest: str | None) -> str:
    return (digest or "").split(":")[-1]


def _default_entry(state: AppState, models: Models) -> dict[str, Any]:
    """The default model when it is no registered name (a local path): what its shards report."""
    served = models.default
    return {
        "name": served.name,
        "model": served.name,
        "modified_at": created_at(state.started_at),
        "size": int(served.weights_bytes or 0),
        "digest": _hex(served.model_sha or served.group),
        "details": details(None, served.shard_info),
    }


def _entry(manifest: Any) -> dict[str, Any]:
    return {
        "name": manifest.name,
        "model": manifest.name,
        "modified_at": manifest.modified_at,
        "size": int(manifest.size or 0),
        "digest": _hex(manifest.digest),
        "details": details(manifest),
    }


# --- the routes ------------------------------------------------------------------------------


async def root(request: Request) -> Response:
    """Clients probe `/` to find an Ollama server."""
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_API_VERSION, "ember_version": __version__})


async def tags(request: Request) -> Response:
    state: AppState = request.app.state.ember
    models = state.models
    registry = models.registry if models is not None else None
    manifests = await asyncio.to_thread(registry.list) if registry is not None else []
    entries = [_entry(m) for m in manifests]
    if models is not None and not any(models.is_default_name(m.name) for m in manifests):
        entries.insert(0, _default_entry(state, models))
    return JSONResponse({"models": entries})


def _capabilities(template: str | None, shard_info: dict | None) -> list[str]:
    found = ["completion"]
    if template and "tools" in template:
        found.append("tools")
    if (shard_info or {}).get("supports_embeddings"):
        found.append("embedding")
    return found


def _weights_info(registry: Any, manifest: Any) -> dict[str, Any]:
    """`embedding_length` and friends from the weights' own metadata, for a model that is not loaded."""
    with contextlib.suppress(Exception):  # a missing or odd file leaves the keys out, never fails /api/show
        if manifest.format == "safetensors" and "config.json" in manifest.files:
            config = json.loads(registry.blob_path(manifest.files["config.json"]).read_text())
            config = config.get("text_config") or config
            keys = {"embedding_length": "hidden_size", "block_count": "num_hidden_layers"}
            return {k: config[v] for k, v in keys.items() if isinstance(config.get(v), int)}
        if manifest.format == "gguf":
            from gguf import GGUFReader

            reader = GGUFReader(str(registry.blob_path(manifest.digest)), "r")
            arch = manifest.architecture or manifest.family
            found = {}
            for key in ("embedding_length", "block_count"):
                item = reader.fields.get(f"{arch}.{key}")
                if item is not None and item.data:
                    found[key] = int(item.parts[item.data[0]][0])
            return found
    return {}


def model_info(manifest: Any, served: Served | None, weights: dict[str, Any]) -> dict[str, Any]:
    info = served.shard_info if served is not None else {}
    arch = str((manifest.family or manifest.architecture) if manifest else info.get("model_type") or "unknown")
    found: dict[str, Any] = {"general.architecture": arch}
    if manifest is not None and manifest.parameter_count:
        found["general.parameter_count"] = int(manifest.parameter_count)
    context = (manifest.context_length if manifest else None) or info.get("max_position_embeddings")
    if context:
        found[f"{arch}.context_length"] = int(context)
    for key, value in weights.items():
        found[f"{arch}.{key}"] = value
    if info.get("hidden_size"):
        found[f"{arch}.embedding_length"] = int(info["hidden_size"])
    return found


async def show(request: Request) -> Response:
    try:
        body = await body_of(request)
        name = _body_name(body)
        state: AppState = request.app.state.ember
        models = state.models
        registry = models.registry if models is not None else None
        manifest = _find(registry, name)
        if manifest is None:
            if models is None or not models.is_default_name(name):
                raise ModelNotFound(name)
            return JSONResponse(_show_default(state, models))
        served = models.served(models.target(manifest.name)) if models is not None else None
        extras = await asyncio.to_thread(registry.extras, manifest.name)
        weights = await asyncio.to_thread(_weights_info, registry, manifest)
        return JSONResponse(_show_body(manifest, served, extras, weights))
    except EmberError as exc:
        return ollama_error(exc)


def _show_body(manifest: Any, served: Served | None, extras: dict, weights: dict) -> dict[str, Any]:
    parameters = dict(manifest.parameters or {})
    document = mf.Modelfile(
        base=manifest.base or manifest.name,
        template=manifest.template,
        system=manifest.system,
        license=extras.get("license"),
        parameters=parameters,
        messages=list(extras.get("messages") or []),
    )
    header = f"Modelfile generated by Ember for {manifest.name}\nTo build a new model from this one, change FROM"
    body: dict[str, Any] = {
        "modelfile": mf.render(document, header),
        "parameters": mf.parameters_text(parameters),
        "template": manifest.template or "",
        "details": details(manifest),
        "model_info": model_info(manifest, served, weights),
        "capabilities": _capabilities(manifest.template, served.shard_info if served else None),
        "modified_at": manifest.modified_at,
    }
    if manifest.system:
        body["system"] = manifest.system
    if extras.get("license"):
        body["license"] = extras["license"]
    if extras.get("messages"):
        body["messages"] = extras["messages"]
    return body


def _show_default(state: AppState, models: Models) -> dict[str, Any]:
    served = models.served(models.target(None))
    info = (served or models.default).shard_info
    template = state.chat_template.source if getattr(state.chat_template, "source", None) else ""
    return {
        "modelfile": mf.render(mf.Modelfile(base=models.default.name, template=template or None)),
        "parameters": "",
        "template": template,
        "details": details(None, info),
        "model_info": model_info(None, served or models.default, {}),
        "capabilities": _capabilities(template, info),
        "modified_at": created_at(state.started_at),
    }


def _wall(monotonic_at: float) -> str:
    return created_at(time.time() + (monotonic_at - time.monotonic()))


def _expires_at(served: Served, default_keep_alive: float) -> str:
    """When `served` unloads, as wall time: its timer, else (in use) its keep_alive from now; far away if never."""
    if served.expires_at is not None:
        return _wall(served.expires_at)
    keep = served.keep_alive if served.keep_alive is not None else default_keep_alive
    if served.default or keep is None or math.isinf(keep) or keep < 0:
        return created_at(time.time() + NO_EXPIRY_S)
    return created_at(time.time() + keep)


async def ps(request: Request) -> Response:
    state: AppState = request.app.state.ember
    models = state.models
    if models is None:
        return JSONResponse({"models": []})
    registry = models.registry
    entries = []
    for served in list(models.loaded.values()):
        if served.stopping:
            continue
        manifest = await asyncio.to_thread(_quiet_find, registry, served.name)
        entry = _entry(manifest) if manifest is not None else _default_entry(state, models)
        entry["name"] = entry["model"] = served.name
        on_gpu = str(served.shard_info.get("device_type", "cpu")).lower() not in ("cpu", "")
        entry.update(
            size=int(served.memory),
            expires_at=_expires_at(served, models.keep_alive),
            size_vram=int(served.memory) if on_gpu else 0,
            context_length=int(getattr(served.limits, "max_total_tokens", 0) or 0),
        )
        entries.append(entry)
    return JSONResponse({"models": entries})


def _body_name(body: dict, *keys: str) -> str:
    """The model a body names (`model`, else the older `name`), as a non-empty string."""
    for key in keys or ("model", "name"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise BodyError(f"{key} must be a non-empty string")
            return value
    raise BodyError(f"{' or '.join(keys or ('model',))} is required")


# --- pull ------------------------------------------------------------------------------------


class _Progress:
    """Turns the registry's `progress(stage, done, total)` calls, on the pulling thread, into Ollama's status
    lines on the event loop: `pulling <digest>` with counts, then `verifying sha256 digest` once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, digest: str | None) -> None:
        self.loop, self.queue, self.digest = loop, queue, digest
        self.last: tuple[str, float] | None = None
        self.verifying = False

    def __call__(self, stage: str, done: float, total: float | None) -> None:
        if stage in VERIFY_STAGES:
            if not self.verifying:
                self.verifying = True
                self._put({"status": "verifying sha256 digest"})
            return
        if stage not in PROGRESS_STAGES:
            return
        share = done / total if total else 0.0
        if self.last is not None and self.last[0] == stage and share - self.last[1] < PROGRESS_STEP and share < 1:
            return
        self.last = (stage, share)
        short = _hex(self.digest)[:12] or "model"
        record: dict[str, Any] = {"status": f"pulling {short}"}
        if self.digest:
            record["digest"] = self.digest
        if total:
            record["total"] = int(total)
        record["completed"] = int(done)
        self._put(record)

    def _put(self, record: dict) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("line", record))


def _pull_digest(registry: Any, name: str) -> str | None:
    entry = getattr(registry, "catalog", {}).get(name)
    return f"sha256:{entry.sha256}" if entry is not None else None


def _registry_failure(exc: BaseException, name: str) -> EmberError:
    """A registry exception as Ollama's error: unknown names and Hub repositories 404, bad names 400, the rest
    500 with the reason."""
    from ember.registry import ModelNotFound as Unknown

    if isinstance(exc, EmberError):
        return exc
    if isinstance(exc, Unknown):
        error = ModelNotFound(name)
        error.detail = f"pull model manifest: model '{name}' not found: {exc}"
        return error
    if isinstance(exc, (ModelNameError, ValueError)):
        return BodyError(str(exc))
    return StoreError(str(exc) or type(exc).__name__)


async def pull(request: Request) -> Response:
    try:
        check_management(request)
        body = await body_of(request)
        name = _display(_body_name(body))
        stream = stream_flag(body)
        registry = _registry(request)
        models = _models(request)
    except EmberError as exc:
        return ollama_error(exc)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    progress = _Progress(loop, queue, _pull_digest(registry, name))

    def run() -> None:
        try:
            manifest = registry.pull(name, progress)
        except BaseException as exc:  # reported to the client; the registry kept nothing half-written
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
        else:
            loop.call_soon_threadsafe(queue.put_nowait, ("done", manifest))

    _background(run)
    if not stream:
        item = await _outcome(queue)
        if item[0] == "error":
            return ollama_error(_registry_failure(item[1], name))
        models.forget()
        return JSONResponse({"status": "success"})
    item = await queue.get()  # the first progress, or the end: an unknown name is a 404 before any line
    if item[0] == "error":
        return ollama_error(_registry_failure(item[1], name))
    return ndjson(_pull_lines(item, queue, progress, models, name))


async def _outcome(queue: asyncio.Queue) -> tuple:
    """The worker's last item (`done` or `error`), its progress lines passed over (`stream: false`)."""
    while (item := await queue.get())[0] == "line":
        pass
    return item


async def _pull_lines(first: tuple, queue: asyncio.Queue, progress: _Progress, models: Models, name: str):
    yield line({"status": "pulling manifest"})
    item = first
    while True:
        kind, value = item
        if kind == "error":
            yield error_line(_registry_failure(value, name))
            return
        if kind == "done":
            break
        yield line(value)
        item = await queue.get()
    manifest = value
    if not progress.verifying:  # nothing was fetched (the model was here): each layer shows complete
        for digest in sorted(set(manifest.files.values())):
            yield line(_layer_done(digest, manifest))
        yield line({"status": "verifying sha256 digest"})
    yield line({"status": "writing manifest"})
    models.forget()
    yield line({"status": "success"})


def _layer_done(digest: str, manifest: Any) -> dict[str, Any]:
    size = int(manifest.size or 0) if len(manifest.files) == 1 else None
    record: dict[str, Any] = {"status": f"pulling {_hex(digest)[:12]}", "digest": digest}
    if size is not None:
        record.update(total=size, completed=size)
    return record


async def push(request: Request) -> Response:
    try:
        check_management(request)
        body = await body_of(request)
        _display(_body_name(body))
        raise NotImplementedHere("Ember has no model registry to push to; copy the model's files instead")
    except EmberError as exc:
        return ollama_error(exc)


# --- create ----------------------------------------------------------------------------------

QUANTIZE_ACCEPTED: dict[str, str] = {
    "q8_0": "int8",
    "q4_0": "int4",
    "q4_1": "int4",
    "q4_k_m": "int4",
    "q4_k_s": "int4",
    "int8": "int8",
    "int4": "int4",
    "w4a8": "w4a8",
}
"""`quantize` values /api/create honours, and the precision the model's shards then run at. Ember quantizes
when a model loads, not into new files: the model keeps its weights and is served at that precision
(`--quantize` for its shard group only). Ollama's other kinds (q5, q6, q3, q2, f16) are refused by name."""


def _precision(quantize: str | None) -> str | None:
    if not quantize:
        return None
    precision = QUANTIZE_ACCEPTED.get(quantize.strip().lower())
    if precision is None:
        raise BodyError(
            f"quantize {quantize!r} is not supported: Ember runs weights at {', '.join(QUANTIZE_ACCEPTED)} "
            "(as int8, int4 or w4a8 when the model loads)"
        )
    return precision


def _string(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BodyError(f"{key} must be a string")
    return value


def _create_plan(body: dict) -> tuple[str, mf.Modelfile, dict[str, str], str | None]:
    """The name, the instructions and the uploaded files of a create body, in either of Ollama's forms."""
    name = _display(_body_name(body))
    if body.get("path") is not None:
        raise BodyError("path is not supported: Ember reads no server paths from requests; send the Modelfile text")
    precision = _precision(_string(body, "quantize"))
    text = _string(body, "modelfile")
    try:
        plan = mf.parse(text) if text else mf.Modelfile()
    except mf.ModelfileError as exc:
        raise BodyError(str(exc)) from None
    plan.base = _string(body, "from") or plan.base
    for key in ("template", "system"):
        if _string(body, key) is not None:
            setattr(plan, key, body[key])
    license_value = body.get("license")
    if isinstance(license_value, list) and all(isinstance(x, str) for x in license_value):
        license_value = "\n".join(license_value)
    if license_value is not None:
        if not isinstance(license_value, str):
            raise BodyError("license must be a string or a list of strings")
        plan.license = license_value
    parameters = body.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise BodyError("parameters must be an object")
        plan.parameters.update(parameters)
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(_is_message(m) for m in messages):
            raise BodyError("messages must be a list of {role, content} objects")
        plan.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    files = body.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise BodyError("files must map file names to digests")
    if body.get("adapters") or plan.adapters:
        raise BodyError("adapters are not supported: Ember serves no LoRA adapters")
    if plan.base and plan.base.startswith("@"):
        files = {"model.gguf": plan.base[1:]}
        plan.base = None
    if not plan.base and not files:
        raise BodyError("neither from nor files: name a model to derive from, or upload its files")
    if plan.base and files:
        raise BodyError("from and files name two sources: use one")
    return name, plan, files, precision


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)


def _check_sources(registry: Any, plan: mf.Modelfile, files: dict[str, str]) -> bool:
    """Refuse before any status line: a bad or unknown base (404), bad file names, digests or missing blobs.

    True when the base is not here but a source has it (the catalog, the Hub): the create pulls it first,
    as Ollama's does."""
    pull = False
    if plan.base:
        found = _find(registry, plan.base)
        if found is not None:
            plan.base = found.name
        else:
            ref = parse_name(plan.base)
            if not (ref.on_hub or ref.display in registry.catalog):
                raise ModelNotFound(plan.base)
            plan.base, pull = ref.display, True
    for file, digest in files.items():
        parts = file.split("/")
        if not file or "\0" in file or "\\" in file or file.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise BodyError(f"a file name is relative, without '.', '..', empty parts, NUL or '\\': {file!r}")
        try:
            path = registry.blob_path(digest)
        except ValueError as exc:
            raise BodyError(str(exc)) from None
        if not path.is_file():
            raise BodyError(f"the blob {digest} of {file} is not on this server: upload it first (POST /api/blobs)")
    return pull


def _create(
    registry: Any,
    name: str,
    plan: mf.Modelfile,
    files: dict[str, str],
    report: Callable,
    precision: str | None = None,
    pull_base: bool = False,
) -> Any:
    """The registry's work for a create, on a worker thread; `report(status)` sends a status line."""
    if pull_base:
        report(f"pulling {plan.base}")
        plan.base = registry.pull(plan.base).name
    if files:
        report("reading model metadata")
        manifest = registry.import_blobs(
            name, files, system=plan.system, template=plan.template, parameters=plan.parameters
        )
        if precision is not None:
            manifest = registry.set_precision(manifest.name, precision)
    else:
        base = _required(registry, plan.base)
        report(f"using existing layer {base.digest}")
        if plan.template is not None:
            report("creating template layer")
        if plan.system is not None:
            report("creating system layer")
        if plan.parameters:
            report("creating parameters layer")
        manifest = registry.create(
            name,
            base.name,
            system=plan.system,
            template=plan.template,
            parameters=plan.parameters,
            precision=precision,
        )
    if precision is not None:
        report(f"quantizing to {precision} when loaded")
    if plan.license is not None:
        report("creating license layer")
    registry.set_extras(manifest.name, license=plan.license, messages=plan.messages)
    report("writing manifest")
    return manifest


async def create(request: Request) -> Response:
    try:
        check_management(request)
        body = await body_of(request)
        stream = stream_flag(body)
        name, plan, files, precision = _create_plan(body)
        registry = _registry(request)
        models = _models(request)
        if models.is_default_name(name):
            raise Conflict(f"model '{name}' is the default model of this server (--model-id); create another name")
        pull_base = _check_sources(registry, plan, files)
    except EmberError as exc:
        return ollama_error(exc)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def report(status: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ("line", {"status": status}))

    def run() -> None:
        try:
            _create(registry, name, plan, files, report, precision, pull_base)
        except BaseException as exc:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
        else:
            loop.call_soon_threadsafe(queue.put_nowait, ("done", None))

    report("parsing modelfile")
    _background(run)
    if not stream:
        item = await _outcome(queue)
        if item[0] == "error":
            return ollama_error(_create_failure(item[1], plan))
        models.forget()
        return JSONResponse({"status": "success"})
    return ndjson(_create_lines(queue, models, plan))


def _create_failure(exc: BaseException, plan: mf.Modelfile) -> EmberError:
    from ember.registry import RegistryError

    if isinstance(exc, RegistryError):
        return BodyError(str(exc))
    return _registry_failure(exc, plan.base or "")


async def _create_lines(queue: asyncio.Queue, models: Models, plan: mf.Modelfile):
    while True:
        kind, value = await queue.get()
        if kind == "line":
            yield line(value)
        elif kind == "error":
            yield error_line(_create_failure(value, plan))
            return
        else:
            models.forget()
            yield line({"status": "success"})
            return


# --- blobs -----------------------------------------------------------------------------------


def _blob_path(request: Request) -> tuple[Any, str]:
    """The registry and the `sha256:<hex>` of the path's digest (`sha256:` or Ollama's `sha256-` spelling)."""
    from ember.registry import digest_hex

    registry = _registry(request)
    raw = request.path_params["digest"]
    text = "sha256:" + raw[len("sha256-") :] if raw.startswith("sha256-") else raw
    try:
        return registry, f"sha256:{digest_hex(text)}"
    except ValueError as exc:
        raise BodyError(str(exc)) from None


async def blob_head(request: Request) -> Response:
    try:
        registry, digest = _blob_path(request)
    except EmberError as exc:
        return Response(status_code=400 if exc.status < 500 else exc.status)
    return Response(status_code=200 if registry.blob_path(digest).is_file() else 404)


async def blob_upload(request: Request) -> Response:
    """Stream the body into `blobs/sha256-<hex>-<token>-partial` while hashing; rename it into place when the
    digest matches (201), else delete it (400). Constant memory; at most MAX_BLOB_BYTES."""
    try:
        check_management(request)
        registry, digest = _blob_path(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BLOB_BYTES:
            raise PayloadTooLarge(MAX_BLOB_BYTES)
        blob = registry.blob_path(digest)
        if blob.is_file():
            return Response(status_code=201)
        blob.parent.mkdir(parents=True, exist_ok=True)
        partial = blob.with_name(f"{blob.name}-{secrets.token_hex(4)}-partial")
        try:
            actual = await _receive(request, partial)
            if actual != digest:
                raise BodyError(f"digest mismatch: the body's digest is {actual}, the path names {digest}")
            await asyncio.to_thread(registry.adopt_blob, partial, digest)
        finally:
            partial.unlink(missing_ok=True)
        return Response(status_code=201)
    except EmberError as exc:
        return ollama_error(exc)


async def _receive(request: Request, partial: Any) -> str:
    sha, size, pending = hashlib.sha256(), 0, []
    with open(partial, "wb") as out:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BLOB_BYTES:
                raise PayloadTooLarge(MAX_BLOB_BYTES)
            sha.update(chunk)
            pending.append(chunk)
            if sum(map(len, pending)) >= 1 << 20:
                await asyncio.to_thread(out.writelines, pending)
                pending = []
        await asyncio.to_thread(out.writelines, pending)
        out.flush()
        await asyncio.to_thread(os.fsync, out.fileno())
    return f"sha256:{sha.hexdigest()}"


# --- copy, delete ----------------------------------------------------------------------------


async def copy(request: Request) -> Response:
    try:
        check_management(request)
        body = await body_of(request)
        source, destination = _body_name(body, "source"), _display(_body_name(body, "destination"))
        registry = _registry(request)
        models = _models(request)
        manifest = _required(registry, source)
        if models.is_default_name(destination):
            raise Conflict(f"model '{destination}' is the default model of this server (--model-id)")
        await asyncio.to_thread(registry.copy, manifest.name, destination)
        extras = await asyncio.to_thread(registry.extras, manifest.name)
        await asyncio.to_thread(registry.set_extras, destination, **extras)
        models.forget()
        return Response(status_code=200)
    except EmberError as exc:
        return ollama_error(exc)


async def delete(request: Request) -> Response:
    try:
        check_management(request)
        body = await body_of(request)
        name = _body_name(body)
        registry = _registry(request)
        models = _models(request)
        if models.is_default_name(name):
            raise Conflict(f"model '{name}' is the default model of this server (--model-id); it cannot be deleted")
        manifest = _required(registry, name)
        others = await asyncio.to_thread(registry.list)
        if not any(m.group_key == manifest.group_key and m.name != manifest.name for m in others):
            await models.unload(models.target(manifest.name))  # the last name of these weights: free them too
        await asyncio.to_thread(registry.delete, manifest.name)
        await asyncio.to_thread(registry.set_extras, manifest.name)
        models.forget()
        return Response(status_code=200)
    except EmberError as exc:
        return ollama_error(exc)


def routes(state: AppState) -> list[BaseRoute]:
    """The library routes; mounted before TGI's and the service routes, so GET / answers as Ollama does."""
    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/pull", pull, methods=["POST"]),
        Route("/api/push", push, methods=["POST"]),
        Route("/api/create", create, methods=["POST"]),
        Route("/api/copy", copy, methods=["POST"]),
        Route("/api/delete", delete, methods=["DELETE"]),
        Route("/api/blobs/{digest}", blob_head, methods=["HEAD"]),
        Route("/api/blobs/{digest}", blob_upload, methods=["POST"]),
    ]
