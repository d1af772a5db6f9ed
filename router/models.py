"""The models this router serves, by name: loading on demand, keep_alive, eviction, failures.

A loaded model is a shard group the launcher runs (`router/control.py`) and, here, a
`Served`: its shard client, tokenizer, limits, metrics and its own batcher. Names map
to groups through the registry (`ember.registry`): derived models share their base's
weights, hence its group; a name's own system prompt, template and default parameters
ride on the `Target` a request gets, never on the group.

Policy, as Ollama and its users expect it (the launcher only executes it):

* The first request for a model loads it and waits; requests for loaded models never
  wait behind a load (each load is its own task). A load survives its first client
  going away (`asyncio.shield`), so the next request finds it ready.
* Every HTTP request holds a lease on its model from the moment its name is resolved
  to the end of its response (`release_leases`, called by the app). A model's
  keep_alive timer starts when its last lease ends; `0` unloads it at once, negative
  (`FOREVER`) never. The default model never expires by timer.
* Room (`--max-loaded-models`, `--models-memory`): idle models are unloaded first,
  the one closest to expiry first; never the default model, never one with leases
  (a load waits for one to become idle, bounded, then is refused with 503). A model
  that cannot fit even with every other evictable model gone is refused at once with
  the numbers.
* A group that dies (the launcher's Watch stream says FAILED): its in-flight requests
  end with an error, the model is dropped, and the next request loads it again. The
  default model's death ends the launcher (TGI's contract) and so this router.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ember.cpus import usable_memory
from ember.durations import FOREVER
from ember.model_names import ModelNameError
from ember.model_names import parse as parse_name
from ember.router.control import ControlClient, ControlError
from ember.router.errors import EmberError, NotFound, ValidationError
from ember.router.metrics import Counter, Gauge, Histogram

log = logging.getLogger("ember.router.models")

LEASES = "ember.leases"
"""The scope key holding the leases an HTTP request took (released when its response ends)."""

MANIFEST_TTL_S = 2.0
IDLE_WAIT_S = 30.0
"""How long a load waits for a busy model to become idle before refusing to evict it."""


class ModelNotFound(NotFound):
    error_type = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' not found")
        self.name = name


class ModelUnavailable(EmberError):
    """A model that cannot be loaded now: not enough room, the load failed, or it is stopping."""

    status = 503
    error_type = "model_unavailable"
    metric_label = "model_unavailable"


class ManagementDisabled(EmberError):
    status = 403
    error_type = "forbidden"

    def __init__(self) -> None:
        super().__init__("model management is disabled on this server (--disable-model-management)")


def machine_memory() -> int:
    """The memory models may take three quarters of by default: the machine's, or its container's limit."""
    return usable_memory()


@dataclass
class Target:
    """What a name resolved to: the group serving it and the name's own defaults."""

    name: str  # canonical display name (or the default model id)
    group: str | None  # None: the default model's group, whatever its key
    load_name: str  # what to ask the launcher to load
    size: int = 0  # bytes of weights, from the manifest (the estimate before a first load)
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    manifest: Any = None


@dataclass
class Served:
    """A loaded group, as the router drives it."""

    name: str
    group: str
    infer: Any
    client: Any
    tokenizer: Any
    limits: Any
    metrics: Any
    shard_info: dict[str, Any]
    model_sha: str | None
    template: Any = None
    default: bool = False
    weights_bytes: int = 0
    rss_bytes: int = 0
    load_seconds: float = 0.0
    leases: int = 0
    keep_alive: float = FOREVER
    expires_at: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None
    stopping: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def memory(self) -> int:
        return self.rss_bytes or self.weights_bytes

    async def close(self, reason: str) -> None:
        """Fail whatever is still queued or running, stop the batcher, close the channels."""
        self.infer.batcher.fail_all(reason)
        await self.infer.batcher.stop()
        await self.client.close()
        self.tokenizer.close()


Builder = Callable[[Any, Target], Awaitable[Served]]
"""Connects to a group the launcher reports ready (control Group) and returns it warmed up."""


class ModelMetrics:
    def __init__(self) -> None:
        buckets = [0.5 * 1.5**i for i in range(20)]
        self.loaded = Gauge("ember_models_loaded", "Models loaded (shard groups running)")
        self.load_duration = Histogram("ember_model_load_duration", "Seconds to load a model", buckets, ("model",))
        self.evictions = Counter("ember_model_evictions", "Models unloaded to make room", ("model",))
        self.load_failures = Counter("ember_model_load_failures", "Loads that failed", ("model",))
        self.failures = Counter("ember_model_failures", "Loaded models whose shards died", ("model",))
        self.unloads = Counter("ember_model_unloads", "Models unloaded, by reason", ("model", "reason"))

    def all(self) -> list:
        return [self.loaded, self.load_duration, self.evictions, self.load_failures, self.failures, self.unloads]


class Models:
    def __init__(
        self,
        default: Served,
        default_id: str,
        build: Builder,
        control: ControlClient | None = None,
        registry: Any = None,
        keep_alive: float = 300.0,
        max_loaded: int = 3,
        memory: int | None = None,
        strict: bool = False,
    ) -> None:
        self.default = default
        self.default_id = default_id
        self.build = build
        self.control = control
        self.registry = registry
        self.keep_alive = keep_alive
        self.max_loaded = max_loaded
        self.memory = memory or machine_memory() * 3 // 4
        self.strict = strict
        self.loaded: dict[str, Served] = {default.group: default}
        self.loading: dict[str, asyncio.Task] = {}
        self.unloading: dict[str, asyncio.Task] = {}
        self.estimates: dict[str, int] = {}  # group -> memory seen when it was last loaded
        self.stopped: set[str] = set()  # names explicitly stopped or expired (Jan's `stopped`)
        self.metrics = ModelMetrics()
        self.metrics.loaded.set(1)
        self._watch: asyncio.Task | None = None
        self._manifests: dict[str, tuple[float, Any]] = {}
        self._templates: dict[tuple[str, str], Any] = {}
        default.idle.set()

    @property
    def multi(self) -> bool:
        """Whether other models can be loaded (a launcher's control service is there)."""
        return self.control is not None

    # -- lifecycle

    def start(self) -> None:
        if self.control is not None:
            self._watch = asyncio.create_task(self._watch_groups(), name="ember-models-watch")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for served in list(self.loaded.values()):
            if served.timer is not None:
                served.timer.cancel()
            if not served.default:
                await served.close("the server is shutting down")
        if self.control is not None:
            await self.control.close()

    # -- names

    def is_default_name(self, name: str) -> bool:
        if name in (self.default_id, self.default.name):
            return True
        try:
            return parse_name(name).display == parse_name(self.default_id).display
        except ModelNameError:
            return False

    def target(self, name: str | None, *, fallback: bool = False) -> Target:
        """Resolve a request's model name. `fallback`: unknown names mean the default model (TGI's
        OpenAI routes; off with --strict-model-names), else they are 404."""
        if not name or self.is_default_name(name):
            return self._default_target()
        manifest = None
        if self.registry is not None:
            try:
                manifest = self._find(name)
            except ModelNameError as exc:
                if fallback and not self.strict:
                    return self._default_target()
                raise ValidationError(str(exc)) from None
        if manifest is None:
            if fallback and not self.strict:
                return self._default_target()
            raise ModelNotFound(name)
        group = getattr(manifest, "group_key", None) or manifest.digest.split(":")[-1]
        if group == self.default.group:
            group = None
        return Target(
            name=manifest.name,
            group=group,
            load_name=manifest.name,
            size=int(manifest.size or 0),
            system=manifest.system,
            template=manifest.template,
            parameters=dict(manifest.parameters or {}),
            manifest=manifest,
        )

    def _find(self, name: str) -> Any:
        """The registry's manifest for `name`, remembered for a moment: requests naming a model do not
        each read the store (`forget` drops it when a route changes the library)."""
        now = time.monotonic()
        cached = self._manifests.get(name)
        if cached is not None and now - cached[0] < MANIFEST_TTL_S:
            return cached[1]
        manifest = self.registry.find(name)
        if len(self._manifests) > 1024:
            self._manifests.clear()
        self._manifests[name] = (now, manifest)
        return manifest

    def forget(self) -> None:
        self._manifests.clear()

    def template_for(self, target: Target, served: Served) -> Any:
        """The chat template a request for `target` renders with: the name's own (a derived model's, or the
        manifest's where the weights carry none, as Gemma 3's GGUF), else the served directory's."""
        own = target.template
        if not own or (served.template is not None and served.template.source == own):
            return served.template
        key = (served.group, own)
        template = self._templates.get(key)
        if template is None:
            from ember.router.chat_template import ChatTemplate

            tokens = served.template.special_tokens if served.template is not None else {}
            template = self._templates[key] = ChatTemplate(own, None, tokens)
        return template

    def _default_target(self) -> Target:
        template = None
        if self.registry is not None:
            try:
                manifest = self._find(self.default_id)
            except (ModelNameError, ValueError, OSError):  # a path, not a name
                manifest = None
            template = manifest.template if manifest is not None else None
        return Target(name=self.default.name, group=None, load_name=self.default_id, template=template)

    def group_of(self, target: Target) -> str:
        return self.default.group if target.group is None else target.group

    def served(self, target: Target) -> Served | None:
        served = self.loaded.get(self.group_of(target))
        return None if served is None or served.stopping else served

    # -- leases

    async def acquire(self, target: Target, keep_alive: float | None = None) -> Served:
        """The loaded model for `target`, loading it first if needed; the caller holds a lease
        until `release`."""
        served = self.served(target)
        if served is None:
            served = await self.ensure_loaded(target)
        served.leases += 1
        served.idle.clear()
        served.last_used = time.monotonic()
        self.stopped.discard(target.name)
        if served.timer is not None:
            served.timer.cancel()
            served.timer = None
            served.expires_at = None
        if keep_alive is not None:
            served.keep_alive = keep_alive
        return served

    def release(self, served: Served) -> None:
        served.leases -= 1
        served.last_used = time.monotonic()
        if served.leases > 0:
            return
        served.idle.set()
        if served.default or served.stopping or served.group not in self.loaded:
            return
        seconds = self.keep_alive if served.keep_alive is None else served.keep_alive
        if seconds == FOREVER or math.isinf(seconds):
            served.expires_at = None
            return
        served.expires_at = time.monotonic() + seconds
        loop = asyncio.get_running_loop()
        served.timer = loop.call_later(max(seconds, 0.0), self._expire, served)

    def _expire(self, served: Served) -> None:
        served.timer = None
        if served.leases == 0 and self.loaded.get(served.group) is served:
            log.info("model %s idle for its keep_alive: unloading", served.name)
            self._unload_task(served, "expired")

    # -- loading

    async def ensure_loaded(self, target: Target) -> Served:
        """Load `target`'s group once, however many requests ask at once; a client that goes away
        does not cancel the load (the next request finds it ready)."""
        if self.control is None:
            raise ModelUnavailable(f"model '{target.name}' is not loaded and this router cannot load models")
        group = self.group_of(target)
        while True:
            unloading = self.unloading.get(group)
            if unloading is not None:
                await asyncio.shield(unloading)
            served = self.served(target)
            if served is not None:
                return served
            task = self.loading.get(group)
            if task is None:
                task = asyncio.create_task(self._load(target, group), name=f"ember-load-{target.name}")
                self.loading[group] = task
                task.add_done_callback(lambda _t, g=group: self.loading.pop(g, None))
            return await asyncio.shield(task)

    async def _load(self, target: Target, group: str) -> Served:
        need = self.estimates.get(group) or target.size
        await self._make_room(target, need)
        started = time.monotonic()
        log.info("loading model %s", target.name)
        try:
            reply = await self.control.load(target.load_name)
            served = await self.build(reply, target)
        except ControlError as exc:
            self.metrics.load_failures.inc(target.name)
            if exc.code == "NOT_FOUND":
                raise ModelNotFound(target.name) from None
            if exc.code == "INVALID_ARGUMENT":
                raise ValidationError(str(exc)) from None
            raise ModelUnavailable(f"model '{target.name}' could not be loaded: {exc}") from None
        except EmberError:
            self.metrics.load_failures.inc(target.name)
            raise
        except Exception as exc:
            self.metrics.load_failures.inc(target.name)
            log.exception("loading %s failed", target.name)
            await self._unload_group(group)
            raise ModelUnavailable(f"model '{target.name}' could not be loaded: {exc}") from None
        if served.group != group and group != self.default.group:
            log.warning("the launcher loaded %s as group %s, expected %s", target.name, served.group, group)
        seconds = time.monotonic() - started
        served.load_seconds = seconds
        served.keep_alive = self.keep_alive
        served.idle.set()
        if served.default:
            self.default = served
        self.loaded[served.group] = served
        self.estimates[served.group] = served.memory
        self.metrics.loaded.set(len(self.loaded))
        self.metrics.load_duration.observe(seconds, target.name)
        log.info("model %s loaded in %.1f s (%s)", target.name, seconds, _mib(served.memory))
        return served

    async def _unload_group(self, group: str) -> None:
        try:
            await self.control.unload(group)
        except ControlError as exc:
            log.warning("unloading group %s failed: %s", group, exc)

    async def _make_room(self, target: Target, need: int) -> None:
        """Unload idle models until `target` fits the count and memory limits, or refuse."""
        deadline = time.monotonic() + IDLE_WAIT_S
        while True:
            others = [s for s in self.loaded.values() if not s.stopping]
            used = sum(s.memory for s in others)
            fits_count = len(others) + 1 <= self.max_loaded
            fits_memory = used + need <= self.memory
            if fits_count and fits_memory:
                return
            pinned = sum(s.memory for s in others if s.default)
            if need + pinned > self.memory:
                raise ModelUnavailable(
                    f"model '{target.name}' needs about {_mib(need)} but --models-memory is {_mib(self.memory)} "
                    f"and the default model takes {_mib(pinned)}: it cannot be loaded"
                )
            idle = [s for s in others if not s.default and s.leases == 0]
            if idle:
                victim = min(idle, key=lambda s: (s.expires_at if s.expires_at is not None else math.inf, s.last_used))
                log.info("unloading %s to make room for %s", victim.name, target.name)
                self.metrics.evictions.inc(victim.name)
                await self._unload(victim, "evicted")
                continue
            busy = [s for s in others if not s.default]
            left = deadline - time.monotonic()
            if not busy or left <= 0:
                why = (
                    f"{len(others)} of --max-loaded-models {self.max_loaded} loaded"
                    if not fits_count
                    else f"{_mib(used)} of --models-memory {_mib(self.memory)} in use, {_mib(need)} needed"
                )
                raise ModelUnavailable(
                    f"model '{target.name}' cannot be loaded now: {why}, and every other model is busy"
                )
            waits = [asyncio.ensure_future(s.idle.wait()) for s in busy]
            try:
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    # -- unloading

    def _unload_task(self, served: Served, reason: str) -> asyncio.Task:
        """Start unloading `served` (once): it leaves `loaded` now, so requests for it wait for the
        unload to end and then load it again."""
        group = served.group
        task = self.unloading.get(group)
        if task is None:
            served.stopping = True
            if served.timer is not None:
                served.timer.cancel()
                served.timer = None
            if self.loaded.get(group) is served:
                self.loaded.pop(group)
            self.metrics.loaded.set(len(self.loaded))
            self.metrics.unloads.inc(served.name, reason)
            task = asyncio.create_task(self._stop_group(served, reason), name=f"ember-unload-{served.name}")
            self.unloading[group] = task
            task.add_done_callback(lambda _t: self.unloading.pop(group, None))
        return task

    async def _unload(self, served: Served, reason: str) -> None:
        await asyncio.shield(self._unload_task(served, reason))

    async def _stop_group(self, served: Served, reason: str) -> None:
        await served.close(f"model '{served.name}' was unloaded ({reason})")
        await self._unload_group(served.group)
        self.stopped.add(served.name)
        log.info("model %s unloaded (%s)", served.name, reason)

    async def unload(self, target: Target, wait_s: float = IDLE_WAIT_S) -> bool:
        """Explicit unload (Jan's stop, Ollama's keep_alive 0): waits for in-flight requests
        (bounded), then stops the group. Returns whether it was loaded."""
        self.stopped.add(target.name)
        served = self.loaded.get(self.group_of(target))
        if served is None:
            return False
        if self.control is None:
            raise ModelUnavailable("this router cannot unload models: it runs without a launcher")
        if served.leases:
            try:
                await asyncio.wait_for(served.idle.wait(), wait_s)
            except TimeoutError:
                pass
        await self._unload(served, "stopped")
        return True

    # -- failures

    async def _watch_groups(self) -> None:
        """Follow the launcher's group events: a FAILED group's requests end, the model is dropped."""
        from ember.proto import control_pb2 as cpb

        while True:
            try:
                async for group in self.control.watch():
                    if group.state == cpb.GROUP_STATE_FAILED:
                        await self._failed(group.group, group.reason or "its shards died")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the launcher went away: it is stopping us too
                log.warning("model control watch ended: %s", exc)
                await asyncio.sleep(1.0)

    async def _failed(self, group: str, reason: str) -> None:
        served = self.loaded.get(group)
        if served is None:
            return
        log.error("model %s failed: %s", served.name, reason)
        self.metrics.failures.inc(served.name)
        self.loaded.pop(group, None)
        self.metrics.loaded.set(len(self.loaded))
        if served.timer is not None:
            served.timer.cancel()
        await served.close(f"model '{served.name}' failed: {reason}")

    # -- what routes show

    def state_of(self, name: str) -> str:
        """Jan's state of a registered name: running, stopped (this server stopped it) or downloaded."""
        try:
            target = self.target(name)
        except EmberError:
            return "not_downloaded"
        if self.served(target) is not None:
            return "running"
        return "stopped" if target.name in self.stopped else "downloaded"


async def model_state(request: Any, name: str | None = None, *, fallback: bool = True, keep_alive: float | None = None):
    """The app state as a request naming model `name` sees it (None: the default model), loading the
    model if needed.

    `fallback`: an unknown name means the default model (TGI's OpenAI routes, unless
    --strict-model-names); else it is a 404. The request holds a lease on the model until
    its response ends (the app's `release_leases`), so it is neither evicted nor expired meanwhile.
    """
    state = request.app.state.ember
    models: Models | None = state.models
    if models is None:
        return state
    target = models.target(name, fallback=fallback)
    served = await models.acquire(target, keep_alive)
    request.scope.setdefault(LEASES, []).append((models, served))
    return state.view(served, target, models.template_for(target, served))


def body_model(body: Any) -> str | None:
    """The `model` a JSON body names, if it names one as a string."""
    name = body.get("model") if isinstance(body, dict) else None
    return name if isinstance(name, str) and name else None


def check_management(request: Any):
    """Routes that download, delete, create, start or stop models: refused with --disable-model-management."""
    state = request.app.state.ember
    if not state.model_management:
        raise ManagementDisabled()
    return state


def release_leases(scope: dict) -> None:
    """End the leases an HTTP request took on its models (the app calls this when the response ends)."""
    leases = scope.pop(LEASES, None)
    if leases:
        for models, served in leases:
            models.release(served)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
