"""Stop sequences left out of answers, as OpenAI's and Ollama's routes both answer.

`trim_stop` cuts a whole text; `StopHolder` does the same to a stream, holding back only what
could still begin a stop sequence.
"""

from __future__ import annotations


def trim_stop(text: str, stops: list[str]) -> str:
    """The text before the first stop sequence (OpenAI leaves stop sequences out)."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


class StopHolder:
    """Streamed text with stop sequences left out: holds back what could start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.sent = 0
        self.stopped = False

    def push(self, piece: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        if not self.stops:  # nothing to hold back
            return piece
        # A stop not found so far ends in `piece`: it starts at most `hold` characters before it.
        start = max(len(self.buffer) - self.hold, 0)
        self.buffer += piece
        buffer = self.buffer
        cut = len(buffer)
        for s in self.stops:
            at = buffer.find(s, start)
            if at != -1 and at < cut:
                cut = at
        if cut < len(buffer):
            self.stopped, final = True, True
        end = cut if final else max(cut - self.hold, self.sent)
        out, self.sent = buffer[self.sent : end], end
        return out
