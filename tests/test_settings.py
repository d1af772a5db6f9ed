"""The settings registry: every setting declared once reaches exactly the processes that read it, and nothing
else in Ember reads the environment for a setting."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest

from ember import settings
from ember.launcher.args import parse_args
from ember.launcher.main import router_spec, shard_spec
from ember.router.limits import Limits
from ember.store import ResolvedModel

ROOT = Path(__file__).resolve().parent.parent
CPU_ENV = {"CUDA_VISIBLE_DEVICES": ""}


def _other_value(s: settings.Setting) -> tuple[list[str], object]:
    """Command-line words giving `s` a value other than its default, and the parsed value they mean."""
    if s.kind == "bool":
        return [], True
    if s.kind == "list":
        return ["a", s.flag, "b"], ["a", "b"]
    if s.kind == "optbool":
        value = not s.default if s.default is not None else True
        return ["true" if value else "false"], value
    if s.choices:
        choice = next(c for c in s.choices if c != s.default)
        return [choice], choice
    samples = {
        settings.parse_bytes: ("2GiB", 2 * 1024**3),
        settings.batch_sizes: ("1,2", "1,2"),
        settings.quantize_kind: ("int8", "int8"),
        settings.get("keep-alive").type: ("10m", "10m"),
        float: ("0.5", 0.5),
        str: ("x", "x"),
    }
    if s.type in samples:
        text, value = samples[s.type]
        return [text], value
    return ["7"], 7


def _launch(words: list[str], model: ResolvedModel) -> tuple[argparse.Namespace, argparse.Namespace]:
    """The shard's and the router's parsed flags when the launcher is run with `words`."""
    from ember.router.cli import parse_args as router_args
    from ember.shard.cli import parse_args as shard_args

    args = parse_args(words, CPU_ENV)
    shard_argv = shard_spec(args, model, 0).argv
    router_argv = router_spec(args, model).argv
    shard = shard_args(shard_argv[shard_argv.index("serve") :], environ={})
    router = router_args(router_argv[router_argv.index("--master-shard-uds-path") :], environ={})
    return shard, router


# Launcher settings the children receive as the wiring the launcher derives from them.
DERIVED = {
    "num-shard": {"shard": {"world_size": 7}},
    # (--sharded only settles num-shard: test_launcher_args.py; --model-id: the test below)
    "shard-uds-path": {
        "shard": {"uds_path": "x"},
        "router": {"master_shard_uds_path": "x-0", "control_uds_path": "x-control"},
    },
    "graceful-termination-timeout": {"router": {"graceful_shutdown_timeout": 0.0}},
}


@pytest.mark.parametrize(
    "setting",
    [s for s in settings.SETTINGS if not s.internal and s.name not in ("model-id", "sharded")],
    ids=lambda s: s.name,
)
def test_every_setting_reaches_the_processes_that_read_it(setting, tmp_path):
    model = ResolvedModel(path=tmp_path, model_id="m", sha=None, source="dir")
    words, want = _other_value(setting)
    baseline_shard, baseline_router = _launch([], model)
    shard, router = _launch([setting.flag, *words], model)
    for process, parsed, baseline in (("shard", shard, baseline_shard), ("router", router, baseline_router)):
        if process in setting.readers:
            assert getattr(parsed, setting.dest) == want, f"{setting.flag} did not reach the {process}"
        else:
            assert not hasattr(parsed, setting.dest), f"the {process} does not read {setting.flag}"
            expected = {**vars(baseline), **DERIVED.get(setting.name, {}).get(process, {})}
            assert vars(parsed) == expected, f"{setting.flag} changed the {process}'s flags"


def test_the_model_reaches_the_shard_resolved_and_the_router_by_name(tmp_path):
    shard, router = _launch(["--model-id", "whatever"], ResolvedModel(tmp_path, "whatever", "abc", "dir"))
    assert shard.model_id == str(tmp_path)
    assert (router.model_id, router.tokenizer_name, router.model_sha) == ("whatever", str(tmp_path), "abc")


def test_env_vars_follow_the_registry_in_every_process(tmp_path):
    """An env var set for a child (standalone, without the launcher) means what the launcher's flag means."""
    from ember.router.cli import parse_args as router_args
    from ember.shard.cli import parse_args as shard_args

    env = {
        "QUANTIZE": "w4a8",
        "PREFILL_CHUNK_TOKENS": "64",
        "MAX_INPUT_LENGTH": "99",
        "PREFILL_CHUNKING": "0",
        "EMBER_NATIVE": "off",
        "JSON_OUTPUT": "true",
    }
    shard = shard_args(["serve"], environ=env)
    router = router_args(["--tokenizer-name", str(tmp_path)], environ=env)
    assert (shard.quantize, shard.prefill_chunk_tokens, shard.native_kernels, shard.json_output) == (
        "w4a8",
        64,
        False,
        True,
    )
    assert (router.max_input_tokens, router.prefill_chunking, router.json_output) == (99, False, True)
    with pytest.raises(SystemExit):
        shard_args(["serve"], environ={"QUANTIZE": "awq"})


def test_defaults_are_declared_once():
    """The router's Limits and the parsers take their defaults from the registry (they once drifted:
    waiting_served_ratio 0.3 vs 1.2, cuda_memory_fraction 0.9 vs 1.0)."""
    import inspect

    from ember.shard.runner import load_runner

    limits = Limits()
    for name in (
        "max-concurrent-requests",
        "max-best-of",
        "max-stop-sequences",
        "max-top-n-tokens",
        "waiting-served-ratio",
        "max-waiting-tokens",
        "validation-workers",
        "max-client-batch-size",
        "grammar-compile-timeout",
    ):
        assert getattr(limits, name.replace("-", "_")) == settings.default(name), name
    fraction = inspect.signature(load_runner).parameters["cuda_memory_fraction"].default
    assert fraction == settings.default("cuda-memory-fraction")
    assert len({s.name for s in settings.SETTINGS}) == len(settings.SETTINGS)
    env_names = [n for s in settings.SETTINGS for n in s.env_names]
    assert len(set(env_names)) == len(env_names), "two settings share an env var"


# Reads of the environment that are not Ember settings: the compiler (CC), the devices torch would see,
# the children's inherited environment, and the registry itself.
ENV_READS_ALLOWED = {
    "common/settings.py",
    "launcher/args.py",
    "launcher/main.py",
    "shard/native.py",
    "common/store.py",
    "router/app.py",
    "common/hub.py",  # the Hugging Face Hub's own variables (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE), read per call
    "common/lifeline.py",  # EMBER_PARENT_PID: the launcher's pid, set by the launcher for its children, not a setting
}


def _env_reads(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("environ", "getenv")
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ):
            lines.append(node.lineno)
    return lines


def test_no_module_reads_the_environment_for_a_setting():
    found = {}
    for folder in ("common", "launcher", "router", "shard"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel not in ENV_READS_ALLOWED and _env_reads(path):
                found[rel] = _env_reads(path)
    assert not found, f"read settings through ember.settings, not os.environ: {found}"


def test_allowed_env_reads_are_not_settings():
    """The allowed modules read only names that are not registry env vars (or, in the registry, all of them)."""
    registry_vars = {n for s in settings.SETTINGS for n in s.env_names}
    for rel in ENV_READS_ALLOWED - {"common/settings.py", "launcher/args.py"}:
        text = (ROOT / rel).read_text()
        for var in registry_vars:
            assert f'"{var}"' not in text, f"{rel} reads {var} itself"


def test_settings_help_is_tgi_compatible_for_tgi_flags():
    """TGI's launcher flags keep TGI's names and env vars (a deployment file works with the image swapped)."""
    tgi = {
        "model-id": "MODEL_ID",
        "num-shard": "NUM_SHARD",
        "sharded": "SHARDED",
        "quantize": "QUANTIZE",
        "dtype": "DTYPE",
        "max-input-tokens": "MAX_INPUT_TOKENS",
        "max-total-tokens": "MAX_TOTAL_TOKENS",
        "max-batch-prefill-tokens": "MAX_BATCH_PREFILL_TOKENS",
        "port": "PORT",
        "hostname": "HOSTNAME",
        "cuda-graphs": "CUDA_GRAPHS",
        "json-output": "JSON_OUTPUT",
        "api-key": "API_KEY",
        "payload-limit": "PAYLOAD_LIMIT",
        "max-concurrent-requests": "MAX_CONCURRENT_REQUESTS",
        "cuda-memory-fraction": "CUDA_MEMORY_FRACTION",
        "kv-cache-dtype": "KV_CACHE_DTYPE",
        "waiting-served-ratio": "WAITING_SERVED_RATIO",
        "max-waiting-tokens": "MAX_WAITING_TOKENS",
        "max-batch-size": "MAX_BATCH_SIZE",
        "max-client-batch-size": "MAX_CLIENT_BATCH_SIZE",
        "prefill-chunking": "PREFILL_CHUNKING",
        "shard-uds-path": "SHARD_UDS_PATH",
        "otlp-endpoint": "OTLP_ENDPOINT",
        "otlp-service-name": "OTLP_SERVICE_NAME",
    }
    for name, env in tgi.items():
        assert settings.get(name).env_names[0] == env
        assert not settings.get(name).internal
    assert json.dumps(sorted(tgi))  # every name above exists (get raised otherwise)
