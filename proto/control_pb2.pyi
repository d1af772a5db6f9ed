from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GroupState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_STATE_UNSPECIFIED: _ClassVar[GroupState]
    GROUP_STATE_LOADING: _ClassVar[GroupState]
    GROUP_STATE_READY: _ClassVar[GroupState]
    GROUP_STATE_STOPPING: _ClassVar[GroupState]
    GROUP_STATE_STOPPED: _ClassVar[GroupState]
    GROUP_STATE_FAILED: _ClassVar[GroupState]
GROUP_STATE_UNSPECIFIED: GroupState
GROUP_STATE_LOADING: GroupState
GROUP_STATE_READY: GroupState
GROUP_STATE_STOPPING: GroupState
GROUP_STATE_STOPPED: GroupState
GROUP_STATE_FAILED: GroupState

class LoadRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Group(_message.Message):
    __slots__ = ("group", "name", "state", "master_socket", "model_dir", "model_sha", "weights_bytes", "rss_bytes", "pids", "default", "load_seconds", "reason")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MASTER_SOCKET_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    group: str
    name: str
    state: GroupState
    master_socket: str
    model_dir: str
    model_sha: str
    weights_bytes: int
    rss_bytes: int
    pids: _containers.RepeatedScalarFieldContainer[int]
    default: bool
    load_seconds: float
    reason: str
    def __init__(self, group: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[GroupState, str]] = ..., master_socket: _Optional[str] = ..., model_dir: _Optional[str] = ..., model_sha: _Optional[str] = ..., weights_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., pids: _Optional[_Iterable[int]] = ..., default: _Optional[bool] = ..., load_seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class UnloadReply(_message.Message):
    __slots__ = ("loaded",)
    LOADED_FIELD_NUMBER: _ClassVar[int]
    loaded: bool
    def __init__(self, loaded: _Optional[bool] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListReply(_message.Message):
    __slots__ = ("groups",)
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[Group]
    def __init__(self, groups: _Optional[_Iterable[_Union[Group, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GroupEvent(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: Group
    def __init__(self, group: _Optional[_Union[Group, _Mapping]] = ...) -> None: ...
