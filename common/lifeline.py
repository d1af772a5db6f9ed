"""Child processes that die with the launcher that started them.

A launcher killed outright (SIGKILL, the OOM killer) cannot stop its children, and outside a container
nothing reaps them: an orphaned router would keep its port and hang requests once its log pipe is gone.
So the launcher names itself in each child's environment (`EMBER_PARENT_PID`), and the child watches
that process through a pidfd (Linux 5.3+; elsewhere it polls its parent pid): when the launcher is gone,
the child exits at once. Linux's PR_SET_PDEATHSIG is not used: it fires when the *thread* that forked
the child ends, and the launcher starts models loaded on demand from its control server's threads.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time

PARENT_ENV = "EMBER_PARENT_PID"
POLL_S = 0.5  # where pidfds are missing


def parent_env() -> dict[str, str]:
    """What a child's environment needs to die with this process."""
    return {PARENT_ENV: str(os.getpid())}


def die_with_parent(name: str) -> None:
    """Exit when the process named by EMBER_PARENT_PID ends (nothing to do when it is not set)."""
    raw = os.environ.get(PARENT_ENV)
    if not raw:
        return
    pid = int(raw)
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        _gone(name, pid)
    except (OSError, AttributeError):  # no pidfds here: poll the parent pid instead
        threading.Thread(target=_poll, args=(name, pid), name="lifeline", daemon=True).start()
        return
    if os.getppid() != pid:  # the pid was reused before we looked: our launcher is already gone
        _gone(name, pid)
    threading.Thread(target=_watch, args=(name, pid, fd), name="lifeline", daemon=True).start()


def _watch(name: str, pid: int, fd: int) -> None:
    select.select([fd], [], [])  # readable once the process has exited
    _gone(name, pid)


def _poll(name: str, pid: int) -> None:
    while os.getppid() == pid:
        time.sleep(POLL_S)
    _gone(name, pid)


def _gone(name: str, pid: int) -> None:
    try:
        sys.stderr.write(f"{name}: the launcher (pid {pid}) is gone: exiting\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # the log pipe went with the launcher
        pass
    os._exit(1)
