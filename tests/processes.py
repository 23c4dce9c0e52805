"""The repository's scripts (or code) in a child process started from the repository root, as a user starts
them, and the same killed by SIGKILL at a chosen rename: what a power cut or an OOM kill leaves behind.

A child runs with the repository root as its working directory, so it imports the project's modules and this
package's helpers (``from tests.engine_toy import ...``) the way the tests do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_script(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300, **kwargs
    )


KILL_AT_RENAME = """
import os, runpy, signal, sys
name, left = sys.argv[1], [int(sys.argv[2])]
def killing(rename):
    def at_rename(src, dst, *args, **kwargs):
        if os.fspath(dst).endswith(name):
            left[0] -= 1
            if left[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # the write is complete, the rename has not happened
        return rename(src, dst, *args, **kwargs)
    return at_rename
os.replace, os.rename = killing(os.replace), killing(os.rename)
sys.argv = sys.argv[3:]
if sys.argv[0].endswith(".py"):
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    exec(sys.argv[0])
"""


def killed_at_rename(name: str, *args: str, occurrence: int = 1) -> None:
    """Run ``args`` (a script and its flags, or code), killed by SIGKILL when it renames a file onto a path that
    ends with ``name`` (the ``occurrence``-th time)."""
    proc = run_script(["-c", KILL_AT_RENAME, name, str(occurrence), *args])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
