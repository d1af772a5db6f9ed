"""Jan's model routes (see the package docstring); errors use OpenAI's body on these /v1 paths."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ember.durations import FOREVER
from ember.model_names import ModelNameError
from ember.router.errors import BodyError, EmberError, ValidationError
from ember.router.errors import openai_response as openai_error
from ember.router.http import read_json
from ember.router.models import ModelNotFound, Models, ModelUnavailable, Target, check_management

if TYPE_CHECKING:
    from ember.router.app import AppState

log = logging.getLogger("ember.router.jan")

# Jan's `parameters` hold strings, under these names (the Model schema allows no others).
_PARAMETERS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "num_predict": "token_limit"}


class Conflict(EmberError):
    status = 409
    error_type = "conflict"


class Downloads:
    """Downloads started by POST /v1/models: one task per name, its progress readable by any request."""

    def __init__(self, registry: Any, on_done=None) -> None:
        self.registry = registry
        self.on_done = on_done
        self.tasks: dict[str, asyncio.Task] = {}
        self.progress: dict[str, dict[str, Any]] = {}

    def start(self, name: str) -> None:
        if name in self.tasks and not self.tasks[name].done():
            return
        self.progress[name] = {"completed": 0, "total": None, "error": None}
        self.tasks[name] = asyncio.create_task(self._run(name), name=f"ember-download-{name}")

    async def _run(self, name: str) -> None:
        record = self.progress[name]
        loop = asyncio.get_running_loop()

        def progress(stage: str, done: float, total: float | None) -> None:
            if stage == "download":
                loop.call_soon_threadsafe(record.update, {"completed": int(done), "total": total})

        try:
            await asyncio.to_thread(self.registry.pull, name, progress)
        except Exception as exc:  # a dead source, a full disk, a bad digest: shown on GET
            log.warning("download of %s failed: %s", name, exc)
            record["error"] = str(exc)
        else:
            self.progress.pop(name, None)
            if self.on_done is not None:
                self.on_done()  # the new name resolves at once

    def running(self, name: str) -> dict[str, Any] | None:
        task = self.tasks.get(name)
        if task is not None and not task.done():
            return self.progress.get(name)
        return None

    def failed(self, name: str) -> str | None:
        record = self.progress.get(name)
        return record.get("error") if record else None


def _models(request: Request) -> tuple[AppState, Models]:
    state: AppState = request.app.state.ember
    return state, state.models


def _registry(models: Models | None) -> Any:
    return models.registry if models is not None else None


def _source_url(manifest: Any) -> str:
    source = str(getattr(manifest, "source", "") or "")
    if source.startswith("hf.co/"):
        return "https://huggingface.co/" + source.removeprefix("hf.co/").split(":")[0]
    if source.startswith("hf:"):
        return "https://huggingface.co/" + source.removeprefix("hf:")
    if source.startswith("catalog:"):
        return f"https://pypi.org/search/?q={source.removeprefix('catalog:')}"
    return f"ember:{manifest.name}"  # a local file or a derived model: no URL to show, and no path either


def card(state: AppState, name: str, manifest: Any, model_state: str, extra: dict | None = None) -> dict:
    """One model as OpenAI's and Jan's clients read it."""
    parameters = {}
    defaults = dict(getattr(manifest, "parameters", None) or {})
    for key, jan_key in _PARAMETERS.items():
        if key in defaults:
            parameters[jan_key] = str(defaults[key])
    created = int(state.started_at)
    body: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "ember",
        "name": name,
        "state": model_state,
        "source_url": _source_url(manifest) if manifest is not None else f"ember:{name}",
        "parameters": parameters,
        "metadata": {},
    }
    if manifest is not None:
        body["format"] = manifest.format
        body["size"] = int(manifest.size or 0)
        meta = {"quantization": manifest.quantization, "size": manifest.parameter_size}
        body["metadata"] = {k: v for k, v in meta.items() if v}
        if manifest.context_length:
            body["settings"] = {"ctx_len": str(manifest.context_length)}
    if extra:
        body.update(extra)
    return body


def _state_of(models: Models | None, downloads: Downloads | None, name: str) -> tuple[str, dict | None]:
    if downloads is not None:
        running = downloads.running(name)
        if running is not None:
            return "downloading", {"download": {"completed": running["completed"], "total": running["total"]}}
        error = downloads.failed(name)
        if error:
            return "not_downloaded", {"download": {"error": error}}
    if models is None:
        return "running", None
    return models.state_of(name), None


def _default_card(state: AppState) -> dict:
    models = state.models
    running = models is None or models.served(models.target(None)) is not None
    manifest = None
    if models is not None and models.registry is not None:
        try:
            manifest = models.registry.find(state.model_id)
        except ModelNameError:
            manifest = None
    name = state.model_id
    default_state = "running" if running else ("stopped" if models and name in models.stopped else "downloaded")
    return card(state, name, manifest, default_state)


def _catalog_names(registry: Any) -> list[str]:
    catalog = getattr(registry, "catalog", None) or {}
    return list(catalog)


class JanApi:
    def __init__(self, state: AppState) -> None:
        registry = _registry(state.models)
        self.downloads = Downloads(registry, state.models.forget) if registry is not None else None

    async def list_models(self, request: Request) -> Response:
        state, models = _models(request)
        data = [_default_card(state)]
        seen = {data[0]["id"]}
        registry = _registry(models)
        if registry is not None:
            for manifest in await asyncio.to_thread(registry.list):
                if manifest.name in seen or models.is_default_name(manifest.name):
                    continue
                seen.add(manifest.name)
                model_state, extra = _state_of(models, self.downloads, manifest.name)
                data.append(card(state, manifest.name, manifest, model_state, extra))
            for name in _catalog_names(registry):
                display = _display(name)
                if display in seen or name in seen or models.is_default_name(name):
                    continue
                model_state, extra = _state_of(None, self.downloads, display)
                if model_state == "running":
                    model_state = "not_downloaded"
                data.append(card(state, display, None, model_state, extra))
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        try:
            state, models = _models(request)
            name = request.path_params["model_id"]
            return JSONResponse(await self._card(state, models, name))
        except EmberError as exc:
            return openai_error(exc)

    async def _card(self, state: AppState, models: Models | None, name: str) -> dict:
        if models is None or models.is_default_name(name) or name == state.model_id:
            if models is None and name != state.model_id:
                raise ModelNotFound(name)
            return _default_card(state)
        registry = _registry(models)
        if registry is None:
            raise ModelNotFound(name)
        manifest = _find(registry, name)
        display = manifest.name if manifest is not None else _display(name)
        model_state, extra = _state_of(models, self.downloads, display)
        if manifest is None:
            if extra is None and not _in_catalog(registry, name):
                raise ModelNotFound(name)
            model_state = "downloading" if model_state == "downloading" else "not_downloaded"
        return card(state, display, manifest, model_state, extra)

    async def delete_model(self, request: Request) -> Response:
        try:
            check_management(request)
            state, models = _models(request)
            name = request.path_params["model_id"]
            registry = _registry(models)
            if models is None or registry is None:
                raise ModelNotFound(name)
            if models.is_default_name(name):
                raise Conflict(f"model '{name}' is the default model of this server (--model-id); it cannot be deleted")
            manifest = _find(registry, name)
            if manifest is None:
                raise ModelNotFound(name)
            target = models.target(manifest.name)
            if not any(
                m.group_key == manifest.group_key and m.name != manifest.name
                for m in await asyncio.to_thread(registry.list)
            ):
                await models.unload(target)  # the last name of these weights: they leave memory too
            await asyncio.to_thread(registry.delete, manifest.name)
            models.forget()
            return JSONResponse({"id": manifest.name, "object": "model", "deleted": True})
        except EmberError as exc:
            return openai_error(exc)

    async def start_model(self, request: Request) -> Response:
        try:
            check_management(request)
            state, models = _models(request)
            name = request.path_params["model_id"]
            target = _target(models, name)
            served = await models.ensure_loaded(target) if models.multi else models.served(target)
            if served is None:
                raise ModelUnavailable(f"model '{name}' cannot be started on this server")
            if not served.default:
                served.keep_alive = FOREVER  # started by hand: loaded until stopped (or evicted)
            models.stopped.discard(target.name)
            return JSONResponse({"id": target.name, "object": "model", "state": "running"})
        except EmberError as exc:
            return openai_error(exc)

    async def stop_model(self, request: Request) -> Response:
        try:
            check_management(request)
            state, models = _models(request)
            name = request.path_params["model_id"]
            target = _target(models, name)
            if models.served(target) is not None:
                await models.unload(target)
            models.stopped.add(target.name)
            return JSONResponse({"id": target.name, "object": "model", "state": "stopped"})
        except EmberError as exc:
            return openai_error(exc)

    async def download(self, request: Request) -> Response:
        """POST /v1/models {"model": id}: start a download in the background."""
        try:
            state = check_management(request)
            body = await read_json(request, state.payload_limit)
            name = body.get("model") if isinstance(body, dict) else None
            if not isinstance(name, str) or not name:
                raise BodyError("`model` is required and must be a string")
            return await self._download(request, name)
        except EmberError as exc:
            return openai_error(exc)

    async def download_get(self, request: Request) -> Response:
        """GET /v1/models/download/{id}: Jan's other spelling of the same."""
        try:
            check_management(request)
            return await self._download(request, request.path_params["model_id"])
        except EmberError as exc:
            return openai_error(exc)

    async def _download(self, request: Request, name: str) -> Response:
        state, models = _models(request)
        registry = _registry(models)
        if registry is None or self.downloads is None:
            raise ModelUnavailable("this server has no model store to download into")
        manifest = _find(registry, name)
        if manifest is not None:
            return JSONResponse({"id": manifest.name, "object": "model", "state": "downloaded"})
        display = _display(name)
        self.downloads.start(display)
        return JSONResponse({"id": display, "object": "model", "state": "downloading"})


def _display(name: str) -> str:
    from ember.model_names import parse

    try:
        return parse(name).display
    except ModelNameError as exc:
        raise ValidationError(str(exc)) from None


def _find(registry: Any, name: str) -> Any:
    try:
        return registry.find(name)
    except ModelNameError as exc:
        raise ValidationError(str(exc)) from None


def _in_catalog(registry: Any, name: str) -> bool:
    display = _display(name)
    return any(_display(c) == display for c in _catalog_names(registry))


def _target(models: Models | None, name: str) -> Target:
    if models is None:
        raise ModelNotFound(name)
    return models.target(name, fallback=False)


def install(state: AppState) -> list[BaseRoute]:
    """Jan's routes; they come before the OpenAI family's GET /v1/models routes, which they replace."""
    api = JanApi(state)
    return [
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models", api.download, methods=["POST"]),
        Route("/v1/models/download/{model_id:path}", api.download_get, methods=["GET"]),
        Route("/v1/models/{model_id:path}/start", api.start_model, methods=["PUT"]),
        Route("/v1/models/{model_id:path}/stop", api.stop_model, methods=["PUT"]),
        Route("/v1/models/{model_id:path}", api.get_model, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.delete_model, methods=["DELETE"]),
    ]
