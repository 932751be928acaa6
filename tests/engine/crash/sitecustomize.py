"""Loaded by the kill/SIGTERM tests through PYTHONPATH: makes a `kdforge` subprocess die or be stopped on cue.

KDFORGE_TEST_KILL_IN_SAVE=N: SIGKILL in the middle of the N-th write of last.pt, as a machine losing power would:
the real writer (checkpoint.atomic_save) has its temporary file half written, never renamed.
KDFORGE_TEST_SIGTERM_AT_STEP=N: SIGTERM after optimizer step N, as a cluster scheduler would (with
KDFORGE_TEST_SIGTERM_IN_RUN=TEXT: only in a run whose name contains TEXT, e.g. one stage of a multi-stage recipe).
KDFORGE_TEST_SIGTERM_AT_CHECK=TEXT: SIGTERM at the first stop check (kdforge.engine.signals.check) whose "what"
contains TEXT ("evaluation", "embedded teacher"), i.e. in the middle of that work.
KDFORGE_TEST_SIGTERM_GROUP=1: send those SIGTERMs to the whole process group (DataLoader workers too), as Slurm
and Kubernetes do; otherwise to this process only. KDFORGE_TEST_SIGTERM_STAMP=PATH: write the time it was sent.
KDFORGE_TEST_SCALER_GROWTH_INTERVAL=N: fp16's GradScaler grows its scale every N good steps (torch: 2000), so that
in a short run the scale rises until gradients overflow, then halves: its state decides which steps are skipped.
"""

import os
import signal

_kill_in_save = int(os.environ.get("KDFORGE_TEST_KILL_IN_SAVE", "0"))
_term_at = int(os.environ.get("KDFORGE_TEST_SIGTERM_AT_STEP", "0"))
_term_in_run = os.environ.get("KDFORGE_TEST_SIGTERM_IN_RUN", "")
_term_at_check = os.environ.get("KDFORGE_TEST_SIGTERM_AT_CHECK", "")
_group = os.environ.get("KDFORGE_TEST_SIGTERM_GROUP", "") == "1"
_growth_interval = int(os.environ.get("KDFORGE_TEST_SCALER_GROWTH_INTERVAL", "0"))


def _sigterm():
    stamp = os.environ.get("KDFORGE_TEST_SIGTERM_STAMP")
    if stamp:  # when it was sent, for tests that time how promptly the run stops
        import time

        with open(stamp, "w") as f:
            f.write(repr(time.time()))
    if _group:  # from another process, as a scheduler's: a worker treats a SIGTERM from its parent differently
        import subprocess

        subprocess.run(["kill", "-s", "TERM", "--", f"-{os.getpgid(0)}"], check=False)
    else:
        os.kill(os.getpid(), signal.SIGTERM)


if _kill_in_save:
    import io

    import torch

    import kdforge.engine.checkpoint as ckpt

    _saves = [0]
    _orig_atomic_save = ckpt.atomic_save
    _orig_torch_save = torch.save

    def atomic_save(obj, path):
        if str(path).endswith("last.pt"):
            _saves[0] += 1
        return _orig_atomic_save(obj, path)

    def torch_save(obj, f, *args, **kwargs):
        if _saves[0] != _kill_in_save or isinstance(f, (str, os.PathLike)):
            return _orig_torch_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()  # the real bytes; half of them reach the temporary file before the power goes
        _orig_torch_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    ckpt.atomic_save = atomic_save
    torch.save = torch_save

if _term_at:
    import kdforge.engine.trainer as trainer

    _orig_step = trainer.Trainer.train_step

    def train_step(self, micro):
        out = _orig_step(self, micro)
        if self.step == _term_at and _term_in_run in self.recipe.run.name:
            _sigterm()
        return out

    trainer.Trainer.train_step = train_step

if _term_at_check:
    import kdforge.engine.signals as signals

    _orig_check = signals.check
    _sent = [False]

    def check(what):
        if not _sent[0] and _term_at_check in what:
            _sent[0] = True
            _sigterm()
        return _orig_check(what)

    signals.check = check

if _growth_interval:
    import torch

    _orig_scaler_init = torch.amp.GradScaler.__init__

    def scaler_init(self, *args, **kwargs):
        kwargs["growth_interval"] = _growth_interval
        _orig_scaler_init(self, *args, **kwargs)

    torch.amp.GradScaler.__init__ = scaler_init
