"""The command line as the tests call it (imported as a plain module: tests/ is on sys.path, not a package).

Each ``kdforge ...`` runs in a process of its own, as a user runs it. Starting a Python interpreter and importing
torch and timm costs seconds per command on a 2-core CI machine, more than many of the commands themselves, so the
processes are forked from a *zygote*: one interpreter per test session that has imported torch, timm and the CLI
and done nothing else (in particular it has run no parallel torch op: a process forked after OpenMP has started
its threads hangs in its next parallel region). Each child takes the caller's environment and working directory,
writes its stdout and stderr to files, runs ``kdforge.cli.main`` and exits with its code, so a test sees what a
fresh ``python -m kdforge.cli`` would give it. Calls whose environment changes how an interpreter starts
(PYTHONPATH: sitecustomize hooks, other site directories) get a real fresh interpreter, and so does every call when
KDFORGE_TEST_FRESH_PROCESS=1.
"""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: A seconds-long recipe: random tiny teacher and student, procedural images.
TINY = REPO / "tests" / "recipes" / "tiny.toml"

_ZYGOTE_CODE = r"""
import json, os, runpy, sys, traceback
import torch, timm, kdforge.cli  # imported once; the children share them
requests, replies = sys.stdin.buffer, sys.stdout.buffer
for line in requests:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if req["new_session"]:
                os.setsid()
            os.environ.clear()
            os.environ.update(req["env"])
            os.chdir(req["cwd"])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            sys.argv = ["kdforge", *req["argv"]]
            for path in req["startup"]:  # what a sitecustomize on PYTHONPATH does in a fresh interpreter
                runpy.run_path(path, run_name="sitecustomize")
            code = kdforge.cli.main(req["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code if isinstance(code, int) else 0)
    replies.write((json.dumps({"pid": pid}) + "\n").encode())
    replies.flush()
    _, status = os.waitpid(pid, 0)
    replies.write((json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())
    replies.flush()
"""


class _Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE_CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=dict(os.environ), cwd=REPO)
        self.env = dict(os.environ)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _reply(self, deadline: float | None) -> dict:
        out = self.proc.stdout
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([out], [], [], wait)
        if not ready:
            raise TimeoutError
        line = out.readline()
        if not line:
            raise RuntimeError("the kdforge test zygote died")
        return json.loads(line)

    def run(self, argv: list[str], env: dict, cwd: str, timeout: float | None, startup: list[str],
            new_session: bool):
        with tempfile.TemporaryDirectory(prefix="kdforge-cli-") as tmp:
            paths = {name: os.path.join(tmp, name) for name in ("stdout", "stderr")}
            request = {"argv": argv, "env": env, "cwd": cwd, "startup": startup, "new_session": new_session, **paths}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            deadline = None if timeout is None else time.monotonic() + timeout
            pid = self._reply(deadline)["pid"]
            try:
                returncode = self._reply(deadline)["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._reply(None)
                raise subprocess.TimeoutExpired([sys.executable, "-m", "kdforge.cli", *argv], timeout) from None
            texts = [Path(paths[name]).read_bytes().decode(errors="replace").replace("\r\n", "\n")
                     for name in ("stdout", "stderr")]
        return returncode, texts[0], texts[1]

    def close(self) -> None:
        if self.alive():
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_zygote: _Zygote | None = None


def _forked(args: list[str], env: dict, cwd: str, timeout: float | None, startup: list[str],
            new_session: bool) -> subprocess.CompletedProcess:
    global _zygote
    if _zygote is None or not _zygote.alive():
        _zygote = _Zygote()
        atexit.register(_zygote.close)
    returncode, out, err = _zygote.run(args, env, cwd, timeout, startup, new_session)
    return subprocess.CompletedProcess([sys.executable, "-m", "kdforge.cli", *args], returncode, out, err)


def kdforge(*args, env=None, timeout=900, cwd=None, hooks=None, new_session=False) -> subprocess.CompletedProcess:
    """``python -m kdforge.cli ARGS...`` in a process of its own (this interpreter's; the caller's working
    directory unless ``cwd``, with this checkout importable from there): forked from the session's zygote (see
    the module docstring), or a fresh interpreter where ``env`` changes PYTHONPATH. ``hooks``: a folder whose
    sitecustomize.py the process runs first, as it would from PYTHONPATH (tests/engine/crash); ``new_session``: the
    process leads a process group of its own (a SIGTERM to the group reaches it and its workers only)."""
    args = [str(a) for a in args]
    run_env = dict(env if env is not None else os.environ)
    if hooks is not None and os.environ.get("KDFORGE_TEST_FRESH_PROCESS") == "1":
        run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), str(REPO), run_env.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "kdforge.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=timeout, cwd=cwd,
                              start_new_session=new_session)
    if cwd is not None:
        run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), run_env.get("PYTHONPATH", "")]))
    same_start = run_env.get("PYTHONPATH", "") in (os.environ.get("PYTHONPATH", ""), str(REPO)) or \
        (cwd is not None and run_env.get("PYTHONPATH") == os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    if same_start and hasattr(os, "fork") and os.environ.get("KDFORGE_TEST_FRESH_PROCESS") != "1":
        startup = [str(Path(hooks) / "sitecustomize.py")] if hooks is not None else []
        return _forked(args, run_env, str(cwd if cwd is not None else os.getcwd()), timeout, startup, new_session)
    if hooks is not None:
        run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), str(REPO), run_env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "kdforge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=timeout, cwd=cwd,
                          start_new_session=new_session)
