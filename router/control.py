"""The router's side of the launcher's model control service (`proto/control.proto`).

The router decides which models to load and unload (it sees the requests); the
launcher, the one process supervisor, does it. Load blocks until the group's ranks
answer Health, which can take minutes for a first conversion, so it has no deadline
here: the caller decides how long to wait, and an abandoned Load still completes
in the launcher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from ember.proto import control_pb2 as cpb
from ember.proto import control_pb2_grpc as cpb_grpc
from ember.router.client import unix_url

STATE_NAMES = {
    cpb.GROUP_STATE_LOADING: "loading",
    cpb.GROUP_STATE_READY: "ready",
    cpb.GROUP_STATE_STOPPING: "stopping",
    cpb.GROUP_STATE_STOPPED: "stopped",
    cpb.GROUP_STATE_FAILED: "failed",
}


class ControlError(RuntimeError):
    """A control call failed; `code` is the gRPC status code's name (NOT_FOUND, UNAVAILABLE, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _error(exc: grpc.aio.AioRpcError) -> ControlError:
    return ControlError(exc.code().name, exc.details() or exc.code().name)


class ControlClient:
    def __init__(self, path: str) -> None:
        self.channel = grpc.aio.insecure_channel(unix_url(path), options=[("grpc.enable_retries", 0)])
        self.stub = cpb_grpc.ModelControlStub(self.channel)

    async def load(self, name: str) -> cpb.Group:
        try:
            return await self.stub.Load(cpb.LoadRequest(name=name))
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def unload(self, group: str) -> bool:
        try:
            return (await self.stub.Unload(cpb.UnloadRequest(group=group), timeout=120)).loaded
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def list(self, timeout: float = 10.0) -> list[cpb.Group]:
        try:
            return list((await self.stub.List(cpb.ListRequest(), timeout=timeout)).groups)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def watch(self) -> AsyncIterator[cpb.Group]:
        """Every group's state changes, as the launcher reports them, until the channel closes."""
        call = self.stub.Watch(cpb.WatchRequest())
        try:
            async for event in call:
                yield event.group
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise _error(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()
