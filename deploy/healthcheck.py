#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when the running launcher's server answers GET /health with 200.

A health check runs beside the server with the image's environment, not the server's, so it reads where the
server listens from the launcher's own command line and environment (`--port 8080` under `serve`, `-e PORT`,
`--port` given to `docker run`), falling back to $PORT. Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

LAUNCHER = "ember-launcher"
DEFAULT_PORT = "3000"  # the launcher's own default, where neither --port nor PORT is set
WILDCARDS = {"", "0.0.0.0", "::", "[::]"}
TIMEOUT_S = 12.0  # past the router's own 10 s deadline for the shards' Health


def option(argv: list[str], name: str) -> str | None:
    """The last value of `--name VALUE` or `--name=VALUE` in argv (the last one wins, as with argparse)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def launcher_process() -> tuple[list[str], dict[str, str]] | None:
    """argv and environment of the ember-launcher process this user can see, if any."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if not any(Path(arg).name == LAUNCHER for arg in argv[:2]):
                continue
            raw = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile, or another user's
            continue
        return argv, dict(item.split("=", 1) for item in raw if "=" in item)
    return None


def health_url() -> str:
    found = launcher_process()
    argv, env = found if found else ([], dict(os.environ))
    port = option(argv, "--port") or env.get("PORT") or DEFAULT_PORT
    host = option(argv, "--hostname") or ""
    if host in WILDCARDS:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


def main() -> int:
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
