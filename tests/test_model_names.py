"""Model names (Ollama's `[host/][namespace/]model[:tag]`) and keep_alive durations: the checks every model
route will run first (issue 17's registry builds on them)."""

from __future__ import annotations

import math

import pytest

from ember.durations import FOREVER, DurationError, go_duration, keep_alive_seconds
from ember.model_names import MAX_NAME, ModelNameError, parse


@pytest.mark.parametrize(
    ("name", "display"),
    [
        ("smollm2", "smollm2:latest"),
        ("SmolLM2:Latest", "smollm2:latest"),
        ("gemma3:270m", "gemma3:270m"),
        ("library/gemma3:270m", "library/gemma3:270m"),
        ("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M", "hf.co/bartowski/smollm2-135m-instruct-gguf:q4_k_m"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct:latest"),
        ("my-model.v2:a_b-c.d", "my-model.v2:a_b-c.d"),
    ],
)
def test_names_parse_to_their_canonical_spelling(name, display):
    assert parse(name).display == display


def test_hub_names_are_told_apart():
    assert parse("hf.co/owner/repo:Q4_0").on_hub and parse("owner/repo").on_hub
    assert not parse("smollm2").on_hub
    assert parse("hf.co/owner/repo:Q4_0").host == "hf.co"


def test_names_that_differ_in_case_or_default_tag_are_one_model():
    assert parse("SmolLM2") == parse("smollm2:latest")
    assert parse("a:x") != parse("a:y")


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "non-empty"),
        ("   ", "non-empty"),
        ("../x", "must start with a letter or a digit"),
        ("a/../b", "must start with a letter or a digit"),
        ("x/..", "must start with a letter or a digit"),
        ("/etc/passwd", "is a path"),
        ("..\\x", "is a path"),
        ("a\x00b", "NUL"),
        ("a" * (MAX_NAME + 1), f"at most {MAX_NAME}"),
        ("m:", "empty tag"),
        (":tag", "empty model"),
        ("a//b", "empty namespace"),
        ("café", "must start with a letter or a digit"),
        ("模型", "must start with a letter or a digit"),
        ("a b", "must start with a letter or a digit"),
        ("x:..", "must start with a letter or a digit"),
        ("x:../y", "must start with a letter or a digit"),
        ("a/b/c/d", "more than three"),
        ("bad host!/ns/m", "is not a host name"),
        (None, "non-empty"),
    ],
)
def test_bad_names_are_refused_with_the_rule(name, rule):
    with pytest.raises(ModelNameError, match=rule.replace("(", r"\(")):
        parse(name)


def test_store_keys_hold_only_safe_characters():
    for name in ("smollm2", "hf.co/owner/repo:Q4_K_M", "ns/m.v2:t-1"):
        key = parse(name).key
        assert "/" not in key and ":" not in key and key not in (".", "..") and not key.startswith(".")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 300.0),
        (0, 0.0),
        (5, 5.0),
        (2.5, 2.5),
        (-1, FOREVER),
        ("0", 0.0),
        ("1s", 1.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("-1m", FOREVER),
        ("-1", None),
    ],
)
def test_keep_alive_takes_seconds_and_go_durations(value, seconds):
    if seconds is None:
        with pytest.raises(DurationError):
            keep_alive_seconds(value, 300.0)
    else:
        assert keep_alive_seconds(value, 300.0) == seconds


@pytest.mark.parametrize("value", ["", "5", "m", "1x", "1h 30m", "h1", "1.2.3s", True, [5], float("nan")])
def test_keep_alive_refuses_what_ollama_refuses(value):
    with pytest.raises(DurationError):
        keep_alive_seconds(value, 300.0)


def test_go_durations_sum_their_terms():
    assert go_duration("1h2m3s4ms") == pytest.approx(3723.004)
    assert math.isclose(go_duration("-1.5s"), -1.5)
