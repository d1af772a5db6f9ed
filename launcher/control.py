"""The launcher's ModelControl service (`proto/control.proto`) on a unix socket: gRPC around `GroupManager`.

The router calls it to load, unload, list and watch shard groups. A Load waits
on the manager's future, never on the work itself: when the client cancels or
its deadline passes, the handler returns and the load goes on in its own
thread, so the next Load of that name finds the group ready. Watch streams end
when the client goes away or the launcher stops.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from ember.launcher.groups import GroupError, GroupInfo, GroupManager
from ember.proto import control_pb2 as cpb
from ember.proto import control_pb2_grpc as cpb_grpc

POLL_S = 0.25
"""How often a waiting handler checks that its client is still there."""
WORKERS = 32
"""Handler threads: each Load in flight and each Watch stream holds one while it lasts."""


def group_message(info: GroupInfo) -> cpb.Group:
    """A manager snapshot as the `Group` message."""
    return cpb.Group(
        group=info.group,
        name=info.name,
        state=int(info.state),
        master_socket=info.master_socket,
        model_dir=info.model_dir,
        model_sha=info.model_sha,
        weights_bytes=info.weights_bytes,
        rss_bytes=info.rss_bytes,
        pids=list(info.pids),
        default=info.default,
        load_seconds=info.load_seconds,
        reason=info.reason,
    )


class ControlService(cpb_grpc.ModelControlServicer):
    """Each rpc is one `GroupManager` call; its errors become the status code they name."""

    def __init__(self, groups: GroupManager) -> None:
        self._groups = groups

    def Load(self, request: cpb.LoadRequest, context: grpc.ServicerContext) -> cpb.Group:  # noqa: N802
        future = self._groups.load(request.name)
        while True:
            try:
                return group_message(future.result(timeout=POLL_S))
            except TimeoutError:
                if not context.is_active():
                    return cpb.Group()  # nobody reads it; the load finishes on its own thread
            except GroupError as error:
                context.abort(grpc.StatusCode[error.code], str(error))

    def Unload(self, request: cpb.UnloadRequest, context: grpc.ServicerContext) -> cpb.UnloadReply:  # noqa: N802
        if not request.group:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Unload needs the group's key (Group.group)")
        return cpb.UnloadReply(loaded=self._groups.unload(request.group))

    def List(self, request: cpb.ListRequest, context: grpc.ServicerContext) -> cpb.ListReply:  # noqa: N802
        return cpb.ListReply(groups=[group_message(info) for info in self._groups.list()])

    def Watch(self, request: cpb.WatchRequest, context: grpc.ServicerContext) -> Iterator[cpb.GroupEvent]:  # noqa: N802
        with self._groups.watch() as events:
            while context.is_active():
                try:
                    info = events.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if info is None:
                    return  # the launcher is stopping
                yield cpb.GroupEvent(group=group_message(info))


class ControlServer:
    """The gRPC server of `ControlService` on the unix socket `path` (removed again by `stop`)."""

    def __init__(self, path: str, groups: GroupManager) -> None:
        self.path = path
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="control"))
        cpb_grpc.add_ModelControlServicer_to_server(ControlService(groups), self._server)

    def start(self) -> None:
        address = f"unix://{os.path.abspath(self.path)}"
        if not self._server.add_insecure_port(address):
            raise OSError(f"cannot listen on {address}")
        self._server.start()

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop answering (calls still running get `grace_s`), then remove the socket."""
        self._server.stop(grace_s).wait()
        Path(self.path).unlink(missing_ok=True)
