"""When a request stops generating: length, EOS, or a stop sequence.

One `StopCriteria` per request; the batch calls `step` once per new token with
the text piece the incremental detokenizer produced for it. Stop sequences are
matched on decoded text, so a stop string split across several tokens is
found; only a short rolling window of recent text is kept, so the cost per
step does not grow with the output.

Checks run in vLLM's order (EOS, then stop sequences, then length), so a
request whose last allowed token is EOS reports ``eos_token`` rather than
``length``. Like TGI, the stop sequence itself stays in the output text; this
class only says *that* and *why* the request finished.
"""

from __future__ import annotations

from ember.proto import generate_pb2

FinishReason = int  # a generate_pb2.FinishReason enum value


class StopCriteria:
    """Per-request stopping state (tokens generated, recent text window)."""

    def __init__(
        self,
        eos_token_ids: set[int],
        max_new_tokens: int,
        stop_sequences: list[str],
        ignore_eos: bool,
        min_new_tokens: int = 0,
    ) -> None:
        self.eos_token_ids = set(eos_token_ids)
        self.max_new_tokens = max_new_tokens
        self.stop_sequences = [s for s in stop_sequences if s]
        self.ignore_eos = ignore_eos
        self.min_new_tokens = min_new_tokens
        self.generated_tokens = 0
        self.matched_stop: str | None = None
        # A match ending in new text starts at most (longest - 1) chars before it.
        self._keep = max((len(s) for s in self.stop_sequences), default=1) - 1
        self._tail = ""

    @classmethod
    def from_pb(cls, pb: generate_pb2.StoppingCriteriaParameters, eos_token_ids: set[int]) -> StopCriteria:
        """Build from the request's proto stopping parameters."""
        return cls(
            eos_token_ids=eos_token_ids,
            max_new_tokens=pb.max_new_tokens,
            stop_sequences=list(pb.stop_sequences),
            ignore_eos=pb.ignore_eos_token,
            min_new_tokens=pb.min_new_tokens,
        )

    def banned_ids(self) -> list[int]:
        """Token ids the sampler must mask now: EOS while below min_new_tokens."""
        if self.ignore_eos or self.generated_tokens >= self.min_new_tokens:
            return []
        return sorted(self.eos_token_ids)

    def step(self, token_id: int, text: str) -> FinishReason | None:
        """Account one generated token (and its text piece); return why it stops, if it does."""
        self.generated_tokens += 1
        may_stop = self.generated_tokens > self.min_new_tokens
        if may_stop and not self.ignore_eos and token_id in self.eos_token_ids:
            return generate_pb2.FINISH_REASON_EOS_TOKEN
        if self.stop_sequences and self._match_stop(text, may_stop):
            return generate_pb2.FINISH_REASON_STOP_SEQUENCE
        if self.generated_tokens >= self.max_new_tokens:
            return generate_pb2.FINISH_REASON_LENGTH
        return None

    def _match_stop(self, text: str, may_stop: bool) -> bool:
        """Search stop strings in (recent tail + new text); keep only the tail needed next time."""
        if not text:
            return False
        window = self._tail + text
        self._tail = window[max(0, len(window) - self._keep) :] if self._keep else ""
        if not may_stop:
            return False
        for stop in self.stop_sequences:
            # Only matches that end inside the new text are new.
            start = max(0, len(window) - len(text) - len(stop) + 1)
            if window.find(stop, start) != -1:
                self.matched_stop = stop
                return True
        return False
