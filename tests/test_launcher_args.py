"""Launcher flags: TGI's names and defaults, env vars, legacy aliases, shard-count rules."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ember.launcher.args import (
    FLAGS,
    build_parser,
    parse_args,
    resolve_num_shard,
    router_flag_argv,
    visible_gpu_count,
)
from ember.settings import parse_bytes

CPU_ENV: dict[str, str] = {"CUDA_VISIBLE_DEVICES": ""}


def test_defaults_follow_tgi_and_ember():
    args = parse_args([], CPU_ENV)
    assert args.model_id == "smollm2"
    assert args.port == 3000
    assert args.hostname == "0.0.0.0"
    assert args.shard_uds_path == "/tmp/ember-server"
    assert (args.master_addr, args.master_port) == ("localhost", 29500)
    assert args.num_shard == 1
    assert args.graceful_termination_timeout == 90
    assert args.max_concurrent_requests == 128
    assert args.waiting_served_ratio == 0.3
    assert (args.max_best_of, args.max_stop_sequences, args.max_top_n_tokens) == (2, 4, 5)
    assert args.max_waiting_tokens == 20
    assert args.payload_limit == 2_000_000
    assert args.json_output is False
    assert args.cors_allow_origin == []
    assert args.max_input_tokens is None and args.max_total_tokens is None


def test_every_flag_reads_its_env_var():
    env = dict(
        CPU_ENV,
        MODEL_ID="/models/x",
        NUM_SHARD="3",
        PORT="80",
        HOSTNAME="127.0.0.1",
        MAX_INPUT_TOKENS="100",
        MAX_TOTAL_TOKENS="200",
        JSON_OUTPUT="true",
        EMBER_CACHE="/c",
        CORS_ALLOW_ORIGIN="https://a.example, https://b.example",
        KV_CACHE_BYTES="1GiB",
        WAITING_SERVED_RATIO="1.2",
        SHARD_UDS_PATH="/tmp/x",
        DTYPE="bfloat16",
    )
    args = parse_args([], env)
    assert args.model_id == "/models/x"
    assert args.num_shard == 3
    assert (args.port, args.hostname) == (80, "127.0.0.1")
    assert (args.max_input_tokens, args.max_total_tokens) == (100, 200)
    assert args.json_output is True
    assert args.cache_dir == "/c"
    assert args.cors_allow_origin == ["https://a.example", "https://b.example"]
    assert args.kv_cache_bytes == 1 << 30
    assert args.waiting_served_ratio == 1.2
    assert args.shard_uds_path == "/tmp/x"
    assert args.dtype == "bfloat16"


def test_command_line_beats_env_and_legacy_alias_works():
    args = parse_args(
        ["--port", "8080", "--max-input-length", "50", "--cors-allow-origin", "x"],
        dict(CPU_ENV, PORT="80", CORS_ALLOW_ORIGIN="y"),
    )
    assert args.port == 8080
    assert args.max_input_tokens == 50
    assert args.cors_allow_origin == ["x"]
    assert parse_args([], dict(CPU_ENV, MAX_INPUT_LENGTH="7")).max_input_tokens == 7


def test_bad_env_value_is_refused_with_its_name(capsys):
    with pytest.raises(SystemExit):
        parse_args([], dict(CPU_ENV, MAX_TOTAL_TOKENS="many"))
    assert "MAX_TOTAL_TOKENS" in capsys.readouterr().err


def test_every_flag_has_help_naming_its_env_var():
    helps = {a.option_strings[0]: a.help for a in build_parser({})._actions if a.option_strings}
    for flag in FLAGS:
        assert f"[env: {flag.env_names[0]}]" in helps[flag.flag]
        assert len(helps[flag.flag]) > 40


@pytest.mark.parametrize(
    ("num_shard", "sharded", "gpus", "expected"),
    [(None, None, 0, 1), (None, None, 4, 4), (None, False, 4, 1), (None, True, 2, 2), (3, None, 0, 3), (2, True, 0, 2)],
)
def test_num_shard_rules(num_shard, sharded, gpus, expected):
    assert resolve_num_shard(num_shard, sharded, gpus) == expected


@pytest.mark.parametrize(("num_shard", "sharded", "gpus"), [(1, True, 0), (2, False, 0), (None, True, 1)])
def test_contradictory_shard_settings_are_refused(num_shard, sharded, gpus):
    with pytest.raises(ValueError, match="sharded"):
        resolve_num_shard(num_shard, sharded, gpus)


def test_sharded_flag_takes_optional_boolean(capsys):
    assert parse_args(["--sharded", "--num-shard", "2"], CPU_ENV).num_shard == 2
    assert parse_args(["--sharded", "false"], CPU_ENV).num_shard == 1
    with pytest.raises(SystemExit):
        parse_args(["--sharded"], CPU_ENV)  # no GPUs and no --num-shard: how many ranks?
    assert "--num-shard" in capsys.readouterr().err


def test_visible_gpu_count_from_env():
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpu_count({"NVIDIA_VISIBLE_DEVICES": "none"}) == 0
    assert visible_gpu_count({"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"}) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1000", 1000), ("2GiB", 2 << 30), ("512MB", 512_000_000), ("1.5k", 1500), ("3 MiB", 3 << 20)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_router_receives_tgi_router_flags_only():
    args = parse_args(
        [
            "--api-key",
            "k",
            "--cors-allow-origin",
            "a",
            "--cors-allow-origin",
            "b",
            "--max-batch-size",
            "8",
            "--json-output",
            "--dtype",
            "float32",
        ],
        CPU_ENV,
    )
    argv = router_flag_argv(args)
    assert argv[argv.index("--api-key") + 1] == "k"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--cors-allow-origin"] == ["a", "b"]
    assert argv[argv.index("--max-batch-size") + 1] == "8"
    assert argv[argv.index("--waiting-served-ratio") + 1] == "0.3"
    assert "--json-output" in argv
    assert "--dtype" not in argv and "--shard-uds-path" not in argv
    assert "--max-input-tokens" not in argv  # unset limits are left to the router's warmup
    assert "--disable-grammar-support" not in argv


def test_router_drains_for_the_launchers_grace_period(tmp_path):
    from ember.launcher.main import router_spec
    from ember.store import ResolvedModel

    args = parse_args(["--graceful-termination-timeout", "120"], CPU_ENV)
    spec = router_spec(args, ResolvedModel(path=tmp_path, model_id="m", sha=None, source="dir"))
    assert spec.argv[spec.argv.index("--graceful-shutdown-timeout") + 1] == "119.0"


def test_cuda_graphs_flag_reaches_the_shard_checked(tmp_path, capsys):
    from ember.launcher.main import shard_spec
    from ember.store import ResolvedModel

    model = ResolvedModel(path=tmp_path, model_id="m", sha=None, source="dir")
    assert "--cuda-graphs" not in shard_spec(parse_args([], CPU_ENV), model, 0).argv  # the shard's default
    for given, passed in (("1, 2,32", "1,2,32"), ("0", "0")):
        argv = shard_spec(parse_args(["--cuda-graphs", given], CPU_ENV), model, 0).argv
        assert argv[argv.index("--cuda-graphs") + 1] == passed
    assert parse_args([], dict(CPU_ENV, CUDA_GRAPHS="4,8")).cuda_graphs == "4,8"
    with pytest.raises(SystemExit):
        parse_args(["--cuda-graphs", "1,x"], CPU_ENV)
    assert "--cuda-graphs" in capsys.readouterr().err


def test_launcher_modules_import_no_torch():
    """The supervisor stays light: torch belongs to the shards."""
    code = "import sys, ember.launcher.main, ember.launcher.supervisor, ember.store; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_prefill_chunk_tokens_reaches_the_shard_and_its_parser(tmp_path):
    from ember.launcher.main import shard_spec
    from ember.shard.cli import _parser
    from ember.store import ResolvedModel

    model = ResolvedModel(path=tmp_path, model_id="m", sha=None, source="dir")
    assert "--prefill-chunk-tokens" not in shard_spec(parse_args([], CPU_ENV), model, 0).argv  # the shard's default
    for given in ("0", "256"):
        argv = shard_spec(parse_args(["--prefill-chunk-tokens", given], CPU_ENV), model, 0).argv
        assert argv[argv.index("--prefill-chunk-tokens") + 1] == given
        shard_argv = argv[argv.index("--model-id") :]
        assert _parser().parse_args(["serve", *shard_argv]).prefill_chunk_tokens == int(given)
    assert parse_args([], dict(CPU_ENV, PREFILL_CHUNK_TOKENS="64")).prefill_chunk_tokens == 64
    with pytest.raises(SystemExit):
        parse_args(["--prefill-chunk-tokens", "-1"], CPU_ENV)
