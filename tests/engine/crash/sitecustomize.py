"""Loaded by the kill/SIGTERM tests through PYTHONPATH: makes a `kdforge train` subprocess die on cue.

KDFORGE_TEST_KILL_IN_SAVE=N: SIGKILL in the middle of the N-th checkpoint write (temporary file half written,
never renamed), as a machine losing power would. KDFORGE_TEST_SIGTERM_AT_STEP=N: send SIGTERM to itself after
optimizer step N, as a cluster scheduler would.
"""

import os
import signal

_kill_in_save = int(os.environ.get("KDFORGE_TEST_KILL_IN_SAVE", "0"))
_term_at = int(os.environ.get("KDFORGE_TEST_SIGTERM_AT_STEP", "0"))

if _kill_in_save or _term_at:
    import kdforge.engine.checkpoint as ckpt
    import kdforge.engine.trainer as trainer

    if _kill_in_save:
        _saves = [0]
        _orig_save = ckpt.atomic_save

        def atomic_save(obj, path):
            if str(path).endswith("last.pt"):
                _saves[0] += 1
                if _saves[0] == _kill_in_save:
                    with open(str(path) + ".partial.tmp", "wb") as f:
                        f.write(b"\x80\x02half a checkpoint")
                    os.kill(os.getpid(), signal.SIGKILL)
            return _orig_save(obj, path)

        ckpt.atomic_save = atomic_save

    if _term_at:
        _orig_step = trainer.Trainer.train_step

        def train_step(self, micro):
            out = _orig_step(self, micro)
            if self.step == _term_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        trainer.Trainer.train_step = train_step
