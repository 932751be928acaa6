"""The command line as the tests call it (imported as a plain module: tests/ is on sys.path, not a package)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: A seconds-long recipe: random tiny teacher and student, procedural images.
TINY = REPO / "tests" / "recipes" / "tiny.toml"


def kdforge(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    """``python -m kdforge.cli ARGS...`` in a subprocess (this interpreter, the caller's working directory)."""
    cmd = [sys.executable, "-m", "kdforge.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
