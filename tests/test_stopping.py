"""StopCriteria: length, EOS, min tokens, stop sequences across token boundaries."""

from __future__ import annotations

from ember.proto import generate_pb2 as pb
from ember.shard.stopping import StopCriteria

EOS = 2


def feed(crit: StopCriteria, steps: list[tuple[int, str]]) -> list:
    return [crit.step(tok, text) for tok, text in steps]


def test_length():
    crit = StopCriteria({EOS}, max_new_tokens=3, stop_sequences=[], ignore_eos=False)
    assert feed(crit, [(5, "a"), (6, "b"), (7, "c")]) == [None, None, pb.FINISH_REASON_LENGTH]
    assert crit.generated_tokens == 3


def test_eos_and_ignore_eos():
    crit = StopCriteria({EOS, 9}, max_new_tokens=10, stop_sequences=[], ignore_eos=False)
    assert feed(crit, [(5, "a"), (9, "")]) == [None, pb.FINISH_REASON_EOS_TOKEN]
    crit = StopCriteria({EOS}, max_new_tokens=3, stop_sequences=[], ignore_eos=True)
    assert feed(crit, [(EOS, ""), (EOS, ""), (EOS, "")]) == [None, None, pb.FINISH_REASON_LENGTH]
    assert crit.banned_ids() == []


def test_eos_on_last_allowed_token_reports_eos():
    crit = StopCriteria({EOS}, max_new_tokens=2, stop_sequences=[], ignore_eos=False)
    assert feed(crit, [(5, "a"), (EOS, "")]) == [None, pb.FINISH_REASON_EOS_TOKEN]


def test_min_new_tokens_bans_eos_then_allows_it():
    crit = StopCriteria({EOS}, max_new_tokens=10, stop_sequences=["x"], ignore_eos=False, min_new_tokens=2)
    assert crit.banned_ids() == [EOS]
    assert crit.step(EOS, "x") is None  # neither EOS nor a stop sequence ends it yet
    assert crit.banned_ids() == [EOS]
    assert crit.step(5, "a") is None
    assert crit.banned_ids() == []
    assert crit.step(EOS, "") == pb.FINISH_REASON_EOS_TOKEN


def test_stop_sequence_inside_one_piece():
    crit = StopCriteria({EOS}, 10, ["</s>"], False)
    assert feed(crit, [(5, "hello"), (6, " wor</s>ld")]) == [None, pb.FINISH_REASON_STOP_SEQUENCE]
    assert crit.matched_stop == "</s>"


def test_stop_sequence_across_token_boundaries():
    crit = StopCriteria({EOS}, 50, ["Observation:", "\n\n"], False)
    pieces = ["The", " answer", " is", " 4", ".", " Obs", "erv", "", "ati", "on", ":"]
    results = feed(crit, [(i, p) for i, p in enumerate(pieces, start=10)])
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert results[-1] == pb.FINISH_REASON_STOP_SEQUENCE
    crit = StopCriteria({EOS}, 50, ["Observation:", "\n\n"], False)
    assert feed(crit, [(11, "a\n"), (12, "\nb")]) == [None, pb.FINISH_REASON_STOP_SEQUENCE]
    assert crit.matched_stop == "\n\n"


def test_window_stays_bounded_and_old_text_does_not_rematch():
    crit = StopCriteria({EOS}, 100_000, ["STOP"], False)
    for _ in range(5000):
        assert crit.step(10, "abc ") is None
    assert len(crit._tail) <= len("STOP") - 1
    assert crit.step(10, "ST") is None
    assert crit.step(10, "OP") == pb.FINISH_REASON_STOP_SEQUENCE


def test_from_pb():
    params = pb.StoppingCriteriaParameters(
        max_new_tokens=4, stop_sequences=["\n"], ignore_eos_token=True, min_new_tokens=1
    )
    crit = StopCriteria.from_pb(params, {EOS})
    assert (crit.max_new_tokens, crit.stop_sequences, crit.ignore_eos, crit.min_new_tokens) == (4, ["\n"], True, 1)
    assert crit.step(EOS, "") is None  # EOS ignored
    assert crit.step(5, "a\nb") == pb.FINISH_REASON_STOP_SEQUENCE
