"""The container image, the parts that need no build: the Dockerfile's instructions, what `.dockerignore`
keeps out, the entrypoint (`deploy/entrypoint.sh`: SageMaker's `serve` mapped as TGI's
sagemaker-entrypoint.sh maps it, run here with a fake launcher on PATH) and the health check
(`deploy/healthcheck.py`). `make image-test` (deploy/image-test.sh) builds the image and boots it."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ember import settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
# What the fake launcher reports of its environment: the settings SageMaker's variables map to.
MAPPED = ("MODEL_ID", "NUM_SHARD", "QUANTIZE", "REVISION", "TRUST_REMOTE_CODE")


# --- the Dockerfile ------------------------------------------------------------------------------------------


def instructions(text: str = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def arguments(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for rest in arguments("ARG"):
        key, _, value = rest.partition("=")
        defaults[key] = value.strip('"')
    return defaults


def test_the_base_and_torch_are_build_arguments():
    first_from = next(i for i, (word, _) in enumerate(instructions()) if word == "FROM")
    before = [rest for word, rest in instructions()[:first_from] if word == "ARG"]
    assert "BASE_IMAGE=python:3.11-slim" in before, "BASE_IMAGE must be declared before the first FROM"
    assert arguments("FROM")[-1] == "${BASE_IMAGE}"
    defaults = arg_defaults()
    assert defaults["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    make_torch = re.search(r"^TORCH_SPEC \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert defaults["TORCH_SPEC"] == make_torch, "the image installs the torch the tests run on"


def test_torch_comes_from_the_torch_wheels_context_when_given_else_from_the_index():
    assert "scratch AS torch-wheels" in arguments("FROM"), "an empty default for --build-context torch-wheels=DIR"
    (install,) = [rest for rest in arguments("RUN") if "from=torch-wheels" in rest]
    assert "--no-index --no-deps --find-links /tmp/torch-wheels" in install  # never a CUDA build from an index
    assert '--index-url "$TORCH_INDEX" "$TORCH_SPEC"' in install


def test_the_image_runs_as_a_user_other_than_root():
    user = arguments("USER")[-1]
    assert user not in ("", "0", "root") and not user.startswith(("0:", "root:"))
    assert user == "${EMBER_UID}" and arg_defaults()["EMBER_UID"] == "1000"  # numeric: runAsNonRoot can check it


def test_pid_1_is_tini_and_the_entrypoint_and_health_check_are_deploys_scripts():
    entrypoint = json.loads(arguments("ENTRYPOINT")[-1])
    assert entrypoint[:2] == ["/usr/bin/tini", "--"]
    copies = dict(reversed(rest.split()) for rest in arguments("COPY") if rest.startswith("deploy/"))
    assert copies[entrypoint[2]] == "deploy/entrypoint.sh"
    healthcheck = arguments("HEALTHCHECK")[-1]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert copies[command[0]] == "deploy/healthcheck.py"
    assert "--start-period=" in healthcheck  # the first start fetches the model
    assert "tini" in next(rest for rest in arguments("RUN") if "apt-get install" in rest)


def test_the_cache_is_the_data_volume():
    assert arguments("VOLUME") == ["/data"]
    assert re.search(r"\bEMBER_CACHE=/data\b", " ".join(arguments("ENV")))


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether `.dockerignore` keeps `path` out of the build context (its patterns as Docker reads them, but
    for `!` exceptions, which this file does not use)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], bare)
            ):
                return True
    return False


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "dockerignored() does not read exceptions"
    return patterns


def test_dockerignore_keeps_the_virtualenv_git_and_caches_out():
    patterns = dockerignore_patterns()
    for path in (".venv", ".git", "common/__pycache__", "ember.egg-info", ".pytest_cache", "data/blobs"):
        assert dockerignored(path, patterns), path


def test_everything_the_dockerfile_copies_is_in_the_build_context():
    patterns = dockerignore_patterns()
    sources = [src for rest in arguments("COPY") for src in rest.split()[:-1] if not src.startswith("--")]
    assert "pyproject.toml" in sources and "deploy/entrypoint.sh" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source, patterns), f".dockerignore keeps out {source}, which the image needs"


# --- the entrypoint ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_launcher(tmp_path: Path) -> Path:
    """A directory whose `ember-launcher` prints its arguments and the mapped environment as JSON."""
    script = tmp_path / "ember-launcher"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"print(json.dumps({{'argv': sys.argv[1:], 'env': {{k: os.environ.get(k) for k in {MAPPED!r}}}}}))\n"
    )
    script.chmod(0o755)
    return tmp_path


def entrypoint(fake_launcher: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in MAPPED and not k.startswith(("HF_", "SM_"))}
    base["PATH"] = f"{fake_launcher}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), *args], env={**base, **env}, capture_output=True, text=True, timeout=30
    )


def launched(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_serve_maps_sagemakers_variables_as_tgi_does(fake_launcher):
    result = entrypoint(
        fake_launcher,
        "serve",
        HF_MODEL_ID="smollm2",
        SM_NUM_GPUS="2",
        HF_MODEL_QUANTIZE="int8",
        HF_MODEL_REVISION="abc123",
        HF_MODEL_TRUST_REMOTE_CODE="true",
    )
    out = launched(result)
    assert out["argv"] == ["--hostname", "0.0.0.0", "--port", "8080"]
    assert out["env"] == {"MODEL_ID": "smollm2", "NUM_SHARD": "2", "QUANTIZE": "int8", "REVISION": None,
                          "TRUST_REMOTE_CODE": None}  # fmt: skip
    assert "HF_MODEL_REVISION=abc123 ignored" in result.stderr
    assert "HF_MODEL_TRUST_REMOTE_CODE ignored" in result.stderr


def test_serve_on_a_cpu_instance_leaves_the_shard_count_to_the_launcher(fake_launcher):
    out = launched(entrypoint(fake_launcher, "serve", "--max-input-tokens", "512", HF_MODEL_ID="m", SM_NUM_GPUS="0"))
    assert out["env"]["NUM_SHARD"] is None and out["env"]["MODEL_ID"] == "m"
    assert out["argv"] == ["--hostname", "0.0.0.0", "--port", "8080", "--max-input-tokens", "512"]


def test_serve_without_hf_model_id_fails_before_the_launcher(fake_launcher):
    result = entrypoint(fake_launcher, "serve", MODEL_ID="smollm2")
    assert result.returncode == 1 and result.stdout == ""
    assert "HF_MODEL_ID must be set" in result.stderr


def test_sagemakers_variables_map_to_settings_the_launcher_has():
    """The entrypoint exports what the launcher reads, and ignores (saying so) exactly what it has no setting for."""
    env_names = {name for s in settings.SETTINGS if not s.internal for name in s.env_names}
    script = ENTRYPOINT.read_text()
    exported = set(re.findall(r"export (\w+)=", script))
    assert exported == {"MODEL_ID", "NUM_SHARD", "QUANTIZE"} and exported <= env_names
    for ignored in ("REVISION", "TRUST_REMOTE_CODE"):
        assert ignored not in env_names, f"the launcher has {ignored} now: map HF_MODEL_{ignored} to it"


@pytest.mark.parametrize(
    ("args", "argv"),
    [
        ((), ["--hostname", "0.0.0.0"]),
        (("--port", "9000"), ["--hostname", "0.0.0.0", "--port", "9000"]),
        (("ember-launcher", "--hostname", "::"), ["--hostname", "0.0.0.0", "--hostname", "::"]),
    ],
)
def test_other_arguments_go_to_the_launcher_bound_to_every_interface(fake_launcher, args, argv):
    assert launched(entrypoint(fake_launcher, *args))["argv"] == argv


def test_a_command_runs_as_given(fake_launcher):
    result = entrypoint(fake_launcher, "sh", "-c", "echo $0", "hello")
    assert result.returncode == 0 and result.stdout == "hello\n"


def test_the_scripts_parse():
    subprocess.run(["/bin/sh", "-n", str(ENTRYPOINT)], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "deploy" / "image-test.sh")], check=True)


# --- the health check ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "deploy" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_health_check_reads_the_port_from_the_launchers_command_line(healthcheck, monkeypatch):
    launcher = ["/opt/ember/bin/python3", "/opt/ember/bin/ember-launcher", "--hostname", "0.0.0.0"]
    cases = [
        (launcher + ["--port", "8080"], {"PORT": "80"}, "http://127.0.0.1:8080/health"),  # serve
        (launcher + ["--port=81"], {}, "http://127.0.0.1:81/health"),
        (launcher, {"PORT": "4000"}, "http://127.0.0.1:4000/health"),  # docker run -e PORT=4000
        (launcher + ["--hostname", "::1"], {}, "http://[::1]:3000/health"),
    ]
    for argv, env, url in cases:
        monkeypatch.setattr(healthcheck, "launcher_process", lambda argv=argv, env=env: (argv, env))
        assert healthcheck.health_url() == url, shlex.join(argv)
    monkeypatch.setattr(healthcheck, "launcher_process", lambda: None)
    monkeypatch.setenv("PORT", "5000")
    assert healthcheck.health_url() == "http://127.0.0.1:5000/health"


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1)])
def test_the_health_check_passes_on_200_only(healthcheck, monkeypatch, status, code):
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        argv = ["python3", "ember-launcher", "--port", str(server.server_address[1])]
        monkeypatch.setattr(healthcheck, "launcher_process", lambda: (argv, {}))
        assert healthcheck.main() == code
    finally:
        server.shutdown()
        server.server_close()
