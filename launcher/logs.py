"""One output stream for the launcher and all its children, prefixed or as JSON lines.

Children write to pipes; a reader thread per child forwards every line to the
shared `LogSink`, which prefixes it with the child's role and rank
(`[shard 0] ...`, `[router] ...`; `[g1 shard 0] ...` for a shard group loaded on
demand) or, with `--json-output`, re-emits it as one JSON object carrying `role`
and `rank` fields (and `group` for an on-demand group). The reader also keeps the last
lines of each child so that a crash report can show them after the fact.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from typing import IO, Any, TextIO

LAUNCHER = "launcher"


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def child_label(role: str, rank: int | None, group: str = "") -> str:
    """`shard 0`, `router`, `g1 shard 0` (rank 0 of an on-demand shard group): how people and messages name a child."""
    label = role if rank is None else f"{role} {rank}"
    return f"{group} {label}" if group else label


class LogSink:
    """Writes whole lines from many threads onto one stream, never interleaving two lines."""

    def __init__(self, stream: TextIO, json_output: bool = False) -> None:
        self._stream = stream
        self._json = json_output
        self._lock = threading.Lock()

    @property
    def json_output(self) -> bool:
        return self._json

    def child_line(self, role: str, rank: int | None, line: str, group: str = "") -> None:
        """Forward one line a child printed; `group` tags the ranks of an on-demand shard group."""
        if self._json:
            self._write(json.dumps(self._child_record(role, rank, line, group), ensure_ascii=False))
        else:
            self._write(f"[{child_label(role, rank, group)}] {line}")

    def launcher(self, message: str, level: str = "INFO", **fields: Any) -> None:
        """A line of the launcher's own; `fields` become JSON keys (text mode shows the message only)."""
        if self._json:
            record = {
                "timestamp": _timestamp(),
                "level": level,
                "role": LAUNCHER,
                "rank": None,
                "message": message,
                **fields,
            }
            self._write(json.dumps(record, ensure_ascii=False))
            return
        marker = "" if level == "INFO" else f"{level}: "
        self._write(f"[{LAUNCHER}] {marker}{message}")

    @staticmethod
    def _child_record(role: str, rank: int | None, line: str, group: str = "") -> dict[str, Any]:
        """The child's own JSON object when the line is one, else the line wrapped as a message."""
        try:
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        record = parsed if isinstance(parsed, dict) else {"timestamp": _timestamp(), "level": "INFO", "message": line}
        record["role"] = role
        record["rank"] = rank
        if group:
            record["group"] = group
        return record

    def _write(self, text: str) -> None:
        with self._lock:
            try:
                self._stream.write(text + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # the launcher's own stdout went away; keep supervising regardless


class ChildOutput:
    """Pumps one child's output (stdout and stderr merged) into the sink, keeping its last lines."""

    def __init__(
        self, role: str, rank: int | None, pipe: IO[bytes], sink: LogSink, keep: int = 50, group: str = ""
    ) -> None:
        self.role = role
        self.rank = rank
        self.group = group
        self._pipe = pipe
        self._sink = sink
        self._tail: collections.deque[str] = collections.deque(maxlen=keep)
        self._tail_lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, name=f"log-{child_label(role, rank, group)}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait until the pipe is drained (EOF), so a crash report includes the final traceback."""
        self._thread.join(timeout)

    def last_lines(self, n: int | None = None) -> list[str]:
        with self._tail_lock:
            lines = list(self._tail)
        return lines if n is None else lines[-n:]

    def _pump(self) -> None:
        with self._pipe:
            for raw in iter(self._pipe.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                with self._tail_lock:
                    self._tail.append(line)
                self._sink.child_line(self.role, self.rank, line, self.group)


class LineWriter:
    """A minimal text stream that turns what is written into launcher log lines (for progress output)."""

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            if line.strip():
                self._sink.launcher(line.strip())
        return len(text)

    def flush(self) -> None:
        """Lines are emitted as soon as they are complete; nothing is held back but a partial line."""
