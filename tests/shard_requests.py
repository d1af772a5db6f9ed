"""Requests as the router sends them to a shard, for tests that drive the engine in process."""

from __future__ import annotations

from ember.proto import generate_pb2 as pb


def shard_request(rid: int, ids: list[int], max_new: int, prefill_logprobs: bool = False, **params) -> pb.Request:
    """Request `rid` for `ids`, `max_new` forced tokens (EOS ignored), neutral sampling unless `params` say."""
    return pb.Request(
        id=rid,
        input_ids=ids,
        prefill_logprobs=prefill_logprobs,
        parameters=pb.NextTokenChooserParameters(**{"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, **params}),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
    )
