"""The training step asks the host for no device value: values reach the host on log steps only, a loss that is not
finite is still caught (on the next log step or checkpoint) and named by its step, and each checkpoint is written
once."""

from pathlib import Path

import pytest
import torch

from kdforge.engine import checkpoint as ckpt
from kdforge.engine.syncs import SyncCounter
from kdforge.engine.trainer import Trainer
from kdforge.errors import TrainingDiverged
from kdforge.recipe import load_recipe

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"


def _trainer(tmp_path, *overrides) -> Trainer:
    return Trainer(load_recipe(TINY, overrides=["eval.before=false", "eval.after=false", *overrides]), tmp_path,
                   show_progress=False)


def _count_per_step(trainer, monkeypatch) -> dict[int, SyncCounter]:
    counted: dict[int, SyncCounter] = {}
    original = trainer.train_step

    def counting(micro):
        with SyncCounter() as syncs:  # the masker's host-side reads are left out (syncs.HOST_SIDE)
            out = original(micro)
        counted[trainer.step] = syncs
        return out

    monkeypatch.setattr(trainer, "train_step", counting)
    return counted


def test_the_counter_sees_a_read_in_kdforge_code(tmp_path):
    """The guard of the tests below: reading the step's metrics (what log steps do) is counted."""
    trainer = _trainer(tmp_path / "r")
    metrics = {"loss": torch.tensor(1.5), "lr": 0.1}
    with SyncCounter() as syncs:
        assert trainer._host_metrics(metrics) == {"loss": 1.5, "lr": 0.1}
    assert syncs.count >= 1 and "kdforge/engine/trainer.py" in syncs.report()
    with SyncCounter() as outside:  # a read outside kdforge is not kdforge's
        float(torch.tensor(2.0))
    assert outside.count == 0


@pytest.mark.parametrize("overrides", [[], ["train.accum_steps=2", "optim.clip_grad=0"]], ids=["plain", "accum"])
def test_no_step_reads_a_device_value(tmp_path, monkeypatch, overrides):
    trainer = _trainer(tmp_path / "r", "train.log_every=4", "train.checkpoint_every=0", "train.max_steps=5",
                       *overrides)
    counted = _count_per_step(trainer, monkeypatch)
    summary = trainer.fit()
    assert sorted(counted) == [1, 2, 3, 4, 5]
    for step, syncs in counted.items():
        assert syncs.count == 0, f"step {step} read the device:\n{syncs.report()}"
    # The log steps (4, and 5: the last) read the values once, after the step: they are real, finite numbers.
    assert summary["final_metrics"]["loss"] > 0 and summary["steps"] == 5


def test_a_nan_between_log_steps_stops_the_run_naming_its_step(tmp_path, monkeypatch):
    run = tmp_path / "r"
    trainer = _trainer(run, "train.log_every=3", "train.checkpoint_every=2")
    patch = trainer.model.losses["patch"]
    original = patch.forward

    def poisoned(s, t, batch):  # step 5's loss (trainer.step counts the steps done)
        loss, m = original(s, t, batch)
        return (loss * float("nan") if trainer.step == 4 else loss), m

    monkeypatch.setattr(patch, "forward", poisoned)
    with pytest.raises(TrainingDiverged) as exc:
        trainer.fit()
    msg = str(exc.value)
    # Step 5 is no log step; step 6 is, and writes a checkpoint: both read the record first and stop.
    assert "at step 5" in msg and "patch=nan" in msg and "token=" in msg, msg
    assert f"the last good checkpoint is {run / 'last.pt'} (step 4)" in msg
    assert ckpt.load_run(run / "last.pt")["step"] == 4 and trainer.step == 6


def test_a_step_checkpoint_is_last_pt_under_a_second_name(tmp_path):
    run = tmp_path / "r"
    trainer = _trainer(run, "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.max_steps=4")
    written = []
    original = ckpt.atomic_save

    def spy(obj, path):
        written.append(Path(path).name)
        return original(obj, path)

    import kdforge.engine.trainer as trainer_module

    trainer_module.ckpt.atomic_save = spy
    try:
        trainer.fit()
    finally:
        trainer_module.ckpt.atomic_save = original
    assert written == ["last.pt"] * 2  # steps 2 and 4 (the last: not again at the end), serialised once each
    steps = sorted(run.glob("step_*.pt"))
    assert [p.name for p in steps] == ["step_00000002.pt", "step_00000004.pt"]
    assert steps[-1].read_bytes() == (run / "last.pt").read_bytes()
    assert ckpt.load_run(steps[0])["step"] == 2  # the older one kept its own bytes when last.pt was replaced


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA's sync debug mode")
def test_no_step_synchronises_on_a_gpu(tmp_path):
    """On a GPU, CUDA's sync debug mode sees every synchronisation, torch's own included."""
    trainer = Trainer(load_recipe(TINY, overrides=["eval.before=false", "eval.after=false", "run.device='cuda'",
                                                   "train.log_every=100", "train.checkpoint_every=0",
                                                   "train.max_steps=4"]), tmp_path / "r", show_progress=False)
    original = trainer.train_step
    syncs = []

    def strict(micro):
        if trainer.step in (1, 2):  # steps 2 and 3: after the first step's allocations, not log steps
            torch.cuda.set_sync_debug_mode("error")
        try:
            return original(micro)
        except RuntimeError as exc:
            syncs.append(str(exc))
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer.train_step = strict
    trainer.fit()
    assert not syncs


def test_one_training_loader_serves_every_epoch(tmp_path, monkeypatch):
    """Workers are started once per run (persistent_workers), not once per epoch."""
    import kdforge.engine.signals as signals

    built = []
    original = signals.DataLoader

    class Counting(original):
        def __init__(self, dataset, *args, **kwargs):
            built.append(kwargs.get("persistent_workers"))
            super().__init__(dataset, *args, **kwargs)

    monkeypatch.setattr(signals, "DataLoader", Counting)
    trainer = _trainer(tmp_path / "r", "train.num_workers=1", "train.checkpoint_every=0")
    summary = trainer.fit()
    assert summary["epochs"] == 3 and built == [True]
