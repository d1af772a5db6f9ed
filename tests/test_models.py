"""The router's model policy (router/models.py) in-process: a fake launcher and registry, real asyncio.

What is checked here is policy only (who loads, when things unload, what gets evicted, what is
refused); tests/test_multi_model_e2e.py runs the same through real processes.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from ember.durations import FOREVER
from ember.model_names import parse
from ember.proto import control_pb2 as cpb
from ember.router.control import ControlError
from ember.router.errors import ValidationError
from ember.router.models import ModelNotFound, Models, ModelUnavailable, Served

MIB = 2**20


class FakeBatcher:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.stopped = False

    def fail_all(self, message: str) -> None:
        self.failed.append(message)

    async def stop(self) -> None:
        self.stopped = True


class FakeClosable:
    def __init__(self) -> None:
        self.closed = False

    def close(self):
        self.closed = True

        async def done():
            return None

        return done()


def served(name: str, group: str, *, default: bool = False, memory: int = 100 * MIB) -> Served:
    tokenizer = SimpleNamespace(closed=False)
    tokenizer.close = lambda: setattr(tokenizer, "closed", True)
    return Served(
        name=name,
        group=group,
        infer=SimpleNamespace(batcher=FakeBatcher()),
        client=FakeClosable(),
        tokenizer=tokenizer,
        limits=None,
        metrics=None,
        shard_info={},
        model_sha=None,
        default=default,
        weights_bytes=memory,
    )


class FakeLauncher:
    """The control service: Load may be held back with `gate` to test concurrent and abandoned loads."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.gate: asyncio.Event | None = None
        self.fail: dict[str, ControlError] = {}

    async def load(self, name: str) -> cpb.Group:
        self.loads.append(name)
        if self.gate is not None:
            await self.gate.wait()
        if name in self.fail:
            raise self.fail[name]
        default = name == "base"
        group = "base-group" if default else parse(name).key
        return cpb.Group(group=group, name=name, state=cpb.GROUP_STATE_READY, default=default)

    async def unload(self, group: str) -> bool:
        self.unloads.append(group)
        return True

    async def list(self):
        return []

    async def watch(self):
        await asyncio.Event().wait()
        yield  # pragma: no cover

    async def close(self) -> None:
        pass


class FakeRegistry:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def find(self, name: str):
        display = parse(name).display
        if display not in self.sizes:
            return None
        return SimpleNamespace(
            name=display,
            digest="sha256:" + parse(name).key,
            size=self.sizes[display],
            system=None,
            template=None,
            parameters={},
        )


def make_models(memory: int = 10_000 * MIB, max_loaded: int = 3, keep_alive: float = 300.0, **sizes: int) -> Models:
    launcher = FakeLauncher()
    registry = FakeRegistry({f"{k}:latest": v for k, v in sizes.items()})

    async def build(group: cpb.Group, target) -> Served:
        return served(
            target.name, group.group, default=group.default, memory=registry.sizes.get(target.name, 100 * MIB)
        )

    models = Models(
        served("base", "base-group", default=True, memory=100 * MIB),
        "base",
        build,
        control=launcher,
        registry=registry,
        keep_alive=keep_alive,
        max_loaded=max_loaded,
        memory=memory,
    )
    models.launcher = launcher
    return models


async def use(models: Models, name: str, keep_alive: float | None = None) -> Served:
    """One request: acquire, then release."""
    s = await models.acquire(models.target(name), keep_alive)
    models.release(s)
    return s


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_names_resolve_to_groups_and_unknown_names_follow_the_route_family():
    models = make_models(a=100 * MIB)
    assert models.target(None).group is None and models.target("base").group is None
    assert models.target("base:latest").group is None
    assert models.target("A").name == "a:latest"  # case-insensitive, tag latest
    with pytest.raises(ModelNotFound):
        models.target("nope")
    assert models.target("nope", fallback=True).group is None  # OpenAI: the default model, as TGI
    models.strict = True
    with pytest.raises(ModelNotFound):
        models.target("nope", fallback=True)  # --strict-model-names, as vLLM
    with pytest.raises(ValidationError):
        models.target("../etc/passwd")


@pytest.mark.asyncio
async def test_concurrent_first_requests_load_once_and_an_abandoned_load_still_finishes():
    models = make_models(a=100 * MIB)
    models.launcher.gate = asyncio.Event()
    first = asyncio.ensure_future(models.acquire(models.target("a")))
    second = asyncio.ensure_future(models.acquire(models.target("a")))
    await wait_until(lambda: models.launcher.loads)
    first.cancel()  # the first client goes away while the model loads
    await asyncio.sleep(0)
    models.launcher.gate.set()
    s = await second
    assert models.launcher.loads == ["a:latest"]
    assert s.leases == 1 and models.loaded[s.group] is s
    # A third request finds it loaded: no new Load.
    await use(models, "a")
    assert models.launcher.loads == ["a:latest"]


@pytest.mark.asyncio
async def test_loaded_models_do_not_wait_behind_a_load():
    models = make_models(a=100 * MIB)
    models.launcher.gate = asyncio.Event()
    loading = asyncio.ensure_future(models.acquire(models.target("a")))
    await wait_until(lambda: models.launcher.loads)
    base = await asyncio.wait_for(models.acquire(models.target(None)), 1.0)  # answers while "a" loads
    assert base.default
    models.release(base)
    models.launcher.gate.set()
    models.release(await loading)


@pytest.mark.asyncio
async def test_keep_alive_zero_unloads_once_the_last_request_ends():
    models = make_models(a=100 * MIB)
    s1 = await models.acquire(models.target("a"), keep_alive=0)
    s2 = await models.acquire(models.target("a"), keep_alive=0)
    models.release(s1)
    await asyncio.sleep(0.05)
    assert s2.group in models.loaded, "a request still runs: the model stays"
    models.release(s2)
    await wait_until(lambda: s2.group not in models.loaded)
    await wait_until(lambda: models.launcher.unloads == [s2.group])
    assert s2.infer.batcher.stopped and s2.client.closed and s2.tokenizer.closed
    assert models.state_of("a") == "stopped"
    # The next request loads it again.
    await use(models, "a")
    assert models.launcher.loads == ["a:latest", "a:latest"]


@pytest.mark.asyncio
async def test_keep_alive_seconds_and_forever():
    models = make_models(a=100 * MIB, b=100 * MIB)
    a = await use(models, "a", keep_alive=0.2)
    b = await use(models, "b", keep_alive=FOREVER)
    assert a.expires_at is not None and b.expires_at is None
    await wait_until(lambda: a.group not in models.loaded, timeout=3.0)
    assert b.group in models.loaded


@pytest.mark.asyncio
async def test_the_server_keep_alive_applies_when_a_request_names_none():
    models = make_models(keep_alive=0.1, a=100 * MIB)
    a = await use(models, "a")
    await wait_until(lambda: a.group not in models.loaded, timeout=3.0)


@pytest.mark.asyncio
async def test_the_default_model_never_expires_by_timer():
    models = make_models(keep_alive=0.0)
    base = await use(models, "base", keep_alive=0)
    await asyncio.sleep(0.05)
    assert base.expires_at is None and models.loaded[base.group] is base


@pytest.mark.asyncio
async def test_eviction_takes_the_idle_model_closest_to_expiry_never_the_default():
    models = make_models(max_loaded=3, a=100 * MIB, b=100 * MIB, c=100 * MIB)
    a = await use(models, "a", keep_alive=100)
    b = await use(models, "b", keep_alive=10)  # b expires first
    c = await use(models, "c")
    assert b.group not in models.loaded and a.group in models.loaded and c.group in models.loaded
    assert models.metrics.evictions.get("b:latest") == 1
    assert models.default.group in models.loaded


@pytest.mark.asyncio
async def test_a_busy_model_is_not_evicted_and_the_load_is_refused_after_waiting(monkeypatch):
    from ember.router import models as models_module

    monkeypatch.setattr(models_module, "IDLE_WAIT_S", 0.2)
    models = make_models(max_loaded=2, a=100 * MIB, b=100 * MIB)
    a = await models.acquire(models.target("a"))  # in flight
    with pytest.raises(ModelUnavailable, match="busy"):
        await models.acquire(models.target("b"))
    assert a.group in models.loaded
    models.release(a)


@pytest.mark.asyncio
async def test_a_load_waits_for_a_busy_model_to_become_idle_then_evicts_it():
    models = make_models(max_loaded=2, a=100 * MIB, b=100 * MIB)
    a = await models.acquire(models.target("a"))
    loading_b = asyncio.ensure_future(models.acquire(models.target("b")))
    await asyncio.sleep(0.05)
    assert not loading_b.done()
    models.release(a)
    b = await asyncio.wait_for(loading_b, 5)
    assert a.group not in models.loaded and b.group in models.loaded


@pytest.mark.asyncio
async def test_memory_evicts_idle_models_and_refuses_one_that_cannot_fit_alone():
    models = make_models(memory=400 * MIB, a=200 * MIB, b=200 * MIB, huge=1000 * MIB)
    a = await use(models, "a")
    b = await use(models, "b")  # 100 (base) + 200 + 200 > 400: a goes
    assert a.group not in models.loaded and b.group in models.loaded
    with pytest.raises(ModelUnavailable) as refused:
        await models.acquire(models.target("huge"))
    message = str(refused.value)
    assert "1000 MiB" in message and "400 MiB" in message and "cannot be loaded" in message
    assert refused.value.status == 503
    assert b.group in models.loaded, "a refused load evicts nothing"


@pytest.mark.asyncio
async def test_a_failed_group_ends_its_requests_and_the_next_request_reloads_it():
    models = make_models(a=100 * MIB)
    a = await models.acquire(models.target("a"))
    await models._failed(a.group, "shard rank 0 died")
    assert a.infer.batcher.failed and "died" in a.infer.batcher.failed[0]
    assert a.group not in models.loaded and models.metrics.failures.get("a:latest") == 1
    models.release(a)
    again = await use(models, "a")
    assert again is not a and models.launcher.loads == ["a:latest", "a:latest"]


@pytest.mark.asyncio
async def test_load_errors_map_to_http_statuses():
    models = make_models(a=100 * MIB, b=100 * MIB)
    models.launcher.fail["a:latest"] = ControlError("FAILED_PRECONDITION", "cannot shard")
    with pytest.raises(ModelUnavailable, match="cannot shard"):
        await models.acquire(models.target("a"))
    models.launcher.fail["b:latest"] = ControlError("NOT_FOUND", "no such model")
    with pytest.raises(ModelNotFound):
        await models.acquire(models.target("b"))
    assert models.metrics.load_failures.get("a:latest") == 1


@pytest.mark.asyncio
async def test_explicit_unload_works_on_the_default_model_too_and_the_next_request_reloads_it():
    models = make_models()
    default_group = models.default.group
    assert await models.unload(models.target(None)) is True
    assert default_group not in models.loaded and models.launcher.unloads == [default_group]
    assert models.state_of("base") == "stopped"
    assert await models.unload(models.target(None)) is False  # idempotent
    await use(models, None)
    assert models.launcher.loads == ["base"]
