"""Validation of a GenerateRequest: TGI's rules, order and wording, in one place.

Parameter checks run first (cheap, on the loop), then the prompt is tokenized
off the loop and the length rules apply. The result, `ValidRequest`, carries
the proto parameter messages the shards receive, so the batcher builds a
`Request` without further work.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from ember.proto import generate_pb2 as pb
from ember.router.errors import ValidationError
from ember.router.grammar import compile_grammar
from ember.router.limits import Limits
from ember.router.tokenizer import TokenizerPool
from ember.router.types import GenerateParameters, GenerateRequest


@dataclass
class ValidRequest:
    inputs: str
    input_ids: list[int]
    max_new_tokens: int
    parameters: pb.NextTokenChooserParameters
    stopping: pb.StoppingCriteriaParameters
    top_n_tokens: int
    decoder_input_details: bool
    details: bool
    return_full_text: bool
    seed: int
    best_of: int
    validation_time: float = 0.0

    @property
    def input_length(self) -> int:
        return len(self.input_ids)

    @property
    def budget(self) -> int:
        """Tokens this request may occupy (TGI's admission rule)."""
        return len(self.input_ids) + self.max_new_tokens


# The shards' proto fields are u32 / u64: out-of-range values are a 422, never a failed Prefill.
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


def _unit_interval(name: str, value: float | None) -> float:
    """top_p / typical_p: 1.0 is accepted as "off" (clients send it; TGI#2222)."""
    if value is None:
        return 1.0
    if not 0.0 < value <= 1.0:
        raise ValidationError(f"`{name}` must be > 0.0 and <= 1.0")
    return value


# Builds a regex grammar's index on the shards (ShardedClient.compile_grammar).
GrammarBuilder = Callable[[str, float], Awaitable[object]]


class Validator:
    def __init__(self, tokenizer: TokenizerPool, limits: Limits, build_grammar: GrammarBuilder | None = None) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.build_grammar = build_grammar

    def check_best_of(self, best_of: int | None, stream: bool) -> int:
        n = 1 if best_of is None else best_of
        if self.limits.max_best_of == 1 and n != 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if n <= 0 or n > self.limits.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {self.limits.max_best_of}. Given: {n}")
        if stream and n != 1:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        return n

    def _sampling(self, p: GenerateParameters, best_of: int) -> pb.NextTokenChooserParameters:
        sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
        if best_of > 1 and not sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        temperature = 1.0 if p.temperature is None else p.temperature
        if temperature <= 0.0:
            raise ValidationError("`temperature` must be strictly positive")
        repetition = 1.0 if p.repetition_penalty is None else p.repetition_penalty
        if repetition <= 0.0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        frequency = 0.0 if p.frequency_penalty is None else p.frequency_penalty
        if not -2.0 <= frequency <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        presence = 0.0 if p.presence_penalty is None else p.presence_penalty
        if not -2.0 <= presence <= 2.0:
            raise ValidationError("`presence_penalty` must be >= -2.0 and <= 2.0")
        top_p = _unit_interval("top_p", p.top_p)
        typical_p = _unit_interval("typical_p", p.typical_p)
        if p.top_k is not None and p.top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        if p.top_k is not None and p.top_k > U32_MAX:
            raise ValidationError(f"`top_k` must be <= {U32_MAX}. Given: {p.top_k}")
        if any(not 0 <= t <= U32_MAX for t in p.logit_bias):
            raise ValidationError("`logit_bias` keys must be token ids >= 0")
        if not 0 <= p.penalty_window <= U32_MAX:
            raise ValidationError(f"the penalty window must be >= 0. Given: {p.penalty_window}")
        min_p = 0.0 if p.min_p is None else p.min_p
        if not 0.0 <= min_p <= 1.0:
            raise ValidationError("`min_p` must be >= 0.0 and <= 1.0")
        top_k = p.top_k or 0
        # The shard samples exactly when told to: any non-default warper turns it on.
        do_sample = p.do_sample or temperature != 1.0 or top_k > 0 or top_p < 1.0 or typical_p < 1.0
        return pb.NextTokenChooserParameters(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            typical_p=typical_p,
            do_sample=do_sample,
            repetition_penalty=repetition,
            frequency_penalty=frequency,
            presence_penalty=presence,
            min_p=min_p,
            watermark=p.watermark,
            logit_bias=[pb.LogitBias(token_id=t, bias=b) for t, b in p.logit_bias.items()],
            penalty_window=p.penalty_window,
        )

    def _seed(self, p: GenerateParameters, best_of: int) -> int:
        if p.seed is None:
            return random.getrandbits(63)
        if best_of > 1:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        if not 0 <= p.seed <= U64_MAX:
            raise ValidationError(f"`seed` must be >= 0 and <= {U64_MAX}. Given: {p.seed}")
        return p.seed

    def _static_checks(self, req: GenerateRequest, best_of: int) -> tuple[pb.NextTokenChooserParameters, int, int]:
        p = req.parameters
        chooser = self._sampling(p, best_of)
        if p.max_new_tokens is not None and p.max_new_tokens <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if len(p.stop) > self.limits.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {self.limits.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
            )
        seed = self._seed(p, best_of)
        top_n = p.top_n_tokens or 0
        if not 0 <= top_n <= self.limits.max_top_n_tokens:
            raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {self.limits.max_top_n_tokens}. Given: {top_n}")
        if not req.inputs and not req.prefix_ids:
            raise ValidationError("`inputs` cannot be empty")
        if p.truncate is not None and (p.truncate <= 0 or p.truncate > self.limits.max_input_tokens):
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {self.limits.max_input_tokens}. "
                f"Given: {p.truncate}"
            )
        return chooser, seed, top_n

    async def _grammar(self, req: GenerateRequest, chooser: pb.NextTokenChooserParameters) -> None:
        grammar = req.parameters.grammar
        if grammar is None:
            return
        if self.limits.disable_grammar_support:
            raise ValidationError("grammar is not supported")
        _, regex = await self.tokenizer.run(compile_grammar, grammar, self.build_grammar is None)
        await self._build_index(regex)
        chooser.grammar = regex
        chooser.grammar_type = pb.GRAMMAR_TYPE_REGEX

    async def _build_index(self, regex: str) -> None:
        """Have the shards build the index now, off their model thread, within the time limit.

        Prefill then finds it cached, so decoding never waits for a compile;
        a grammar too big for the limit fails here, before queueing.
        """
        if self.build_grammar is None:
            return
        limit = self.limits.grammar_compile_timeout
        try:
            await self.build_grammar(regex, limit)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ValidationError(
                    f"grammar is too complex: building its index took longer than {limit:g}s"
                ) from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValidationError(f"grammar is not valid: {exc.details()}") from None
            raise

    def _lengths(self, n_input: int, max_new: int | None) -> int:
        lim = self.limits
        if max_new is None:
            max_new = max(lim.max_total_tokens - n_input, 1)
        if n_input + max_new > lim.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {lim.max_total_tokens}. "
                f"Given: {n_input} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        if n_input > lim.max_input_tokens:
            raise ValidationError(f"`inputs` must have less than {lim.max_input_tokens} tokens. Given: {n_input}")
        return max_new

    async def validate(self, req: GenerateRequest, stream: bool = False) -> ValidRequest:
        started = time.monotonic()
        p = req.parameters
        best_of = self.check_best_of(p.best_of, stream)
        chooser, seed, top_n = self._static_checks(req, best_of)
        chooser.seed = seed
        await self._grammar(req, chooser)
        enc = await self.tokenizer.encode(req.inputs, req.add_special_tokens)
        ids = [*req.prefix_ids, *enc.ids] if req.prefix_ids else enc.ids
        ids = ids[-p.truncate :] if p.truncate else ids
        max_new = self._lengths(len(ids), p.max_new_tokens)
        if not 0 <= p.min_new_tokens <= max_new:
            raise ValidationError(
                f"`min_new_tokens` must be >= 0 and <= `max_new_tokens`. Given: {p.min_new_tokens} and {max_new}"
            )
        if p.decoder_input_details and stream:
            raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
        stopping = pb.StoppingCriteriaParameters(
            max_new_tokens=max_new,
            stop_sequences=p.stop,
            ignore_eos_token=p.ignore_eos,
            min_new_tokens=p.min_new_tokens,
        )
        return ValidRequest(
            inputs=req.inputs,
            input_ids=ids,
            max_new_tokens=max_new,
            parameters=chooser,
            stopping=stopping,
            top_n_tokens=top_n,
            decoder_input_details=p.decoder_input_details,
            details=p.details,
            return_full_text=bool(p.return_full_text),
            seed=seed,
            best_of=best_of,
            validation_time=time.monotonic() - started,
        )
