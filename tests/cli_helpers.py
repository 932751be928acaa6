"""The command line as the tests call it (imported as a plain module: tests/ is on sys.path, not a package)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: A seconds-long recipe: random tiny teacher and student, procedural images.
TINY = REPO / "tests" / "recipes" / "tiny.toml"


def kdforge(*args, env=None, timeout=900, cwd=None) -> subprocess.CompletedProcess:
    """``python -m kdforge.cli ARGS...`` in a subprocess (this interpreter; the caller's working directory unless
    ``cwd``, with this checkout importable from there)."""
    cmd = [sys.executable, "-m", "kdforge.cli", *map(str, args)]
    if cwd is not None:
        env = dict(env if env is not None else os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
