"""The engine end to end on a seconds-long recipe: exact resume after a kill, SIGTERM, NaN, DDP, atomic saves."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import kdforge
import torch

from kdforge.engine import checkpoint as ckpt
from kdforge.engine.trainer import Trainer, cosine_lr
from kdforge.errors import TrainingDiverged
from kdforge.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "recipes" / "tiny.toml"
CRASH = Path(__file__).resolve().parent / "crash"


def run_cli(*args, env_extra=None, check=True):
    """``kdforge train TINY ARGS`` with the crash hooks of tests/engine/crash (``env_extra``), in a process group of
    its own (a SIGTERM to the group reaches it and its DataLoader workers only)."""
    env = {**os.environ, **(env_extra or {})}
    res = kdforge("train", TINY, "--no-progress", *args, env=env, hooks=CRASH, new_session=True)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_run(run_dir / "last.pt")["model"]


def assert_same_weights(a: dict, b: dict, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run_cli("--output-dir", out)
    return out


def test_uninterrupted_run_writes_summary_metrics_and_tensorboard(uninterrupted):
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["steps"] == 18 and summary["epochs"] == 3
    assert set(summary["final_metrics"]) >= {"loss", "lr", "loss/token", "loss/feature", "loss/patch", "grad_norm"}
    rows = [json.loads(l) for l in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 19))
    assert any(p.name.startswith("events.out.tfevents") for p in (uninterrupted / "tb").iterdir())
    assert (uninterrupted / "recipe.toml").is_file()


def test_kill_mid_checkpoint_then_resume_gives_identical_weights(uninterrupted, tmp_path):
    res = run_cli("--output-dir", tmp_path, env_extra={"KDFORGE_TEST_KILL_IN_SAVE": "2"}, check=False)
    assert res.returncode == -signal.SIGKILL
    # The real writer died half-way through the second last.pt: its temporary file is there, never renamed ...
    stale = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(stale) == 1 and 0 < stale[0].stat().st_size < (tmp_path / "last.pt").stat().st_size
    state = ckpt.load_run(tmp_path / "last.pt")  # ... and the first checkpoint survived it
    assert state["step"] == 4
    res = run_cli("--output-dir", tmp_path, "--resume")
    assert not list(tmp_path.glob(".*.tmp"))  # the next start cleaned it up
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 18
    assert_same_weights(weights(tmp_path), weights(uninterrupted))


# The lean data path: two workers (one loader, kept across the 3 epochs) crop and flip in uint8, RandAugment and
# erasing run on the device with per-step seeds.
DEVICE_AUGMENT = ["--set", "augment.device_augment=true", "--set", "augment.auto_augment='rand-m9-mstd0.5-inc1'",
                  "--set", "augment.re_prob=0.25", "--set", "train.num_workers=2"]


@pytest.fixture(scope="module")
def uninterrupted_device_augment(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_augment")
    run_cli("--output-dir", out, *DEVICE_AUGMENT)
    return out


@pytest.mark.parametrize("device_augment", [False, True], ids=["worker_augment", "device_augment"])
def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(device_augment, request, tmp_path):
    extra = DEVICE_AUGMENT if device_augment else []
    full = request.getfixturevalue("uninterrupted_device_augment" if device_augment else "uninterrupted")
    res = run_cli("--output-dir", tmp_path, *extra, env_extra={"KDFORGE_TEST_SIGTERM_AT_STEP": "7"})
    assert "SIGTERM at step 7" in res.stderr and "--resume" in res.stderr
    assert ckpt.load_run(tmp_path / "last.pt")["step"] == 7
    assert not (tmp_path / "summary.json").exists()
    run_cli("--output-dir", tmp_path, *extra, "--resume")
    assert_same_weights(weights(tmp_path), weights(full))
    if device_augment:  # the device path really ran: RandAugment and erasing changed what the student saw
        other = request.getfixturevalue("uninterrupted")
        assert any(not torch.equal(a, b) for a, b in zip(weights(full).values(), weights(other).values()))


def test_existing_run_without_resume_is_refused(uninterrupted):
    res = run_cli("--output-dir", uninterrupted, check=False)
    assert res.returncode == 2 and "--resume" in res.stderr


def test_nan_loss_stops_with_step_and_terms_and_keeps_checkpoint(tmp_path, monkeypatch):
    recipe = load_recipe(TINY, overrides=["train.checkpoint_every=2", "eval.before=false"])
    trainer = Trainer(recipe, tmp_path, show_progress=False)
    token = trainer.model.losses["token"]
    original = token.forward

    def poisoned(s, t, batch):
        loss, m = original(s, t, batch)
        return (loss * float("nan") if trainer.step >= 4 else loss), m

    monkeypatch.setattr(token, "forward", poisoned)
    with pytest.raises(TrainingDiverged) as exc:
        trainer.fit()
    msg = str(exc.value)
    assert "at step 5" in msg and "token=nan" in msg and "feature=" in msg
    assert f"the last good checkpoint is {tmp_path / 'last.pt'} (step 4)" in msg
    assert ckpt.load_run(tmp_path / "last.pt")["step"] == 4


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.atomic_save({"step": 1}, path)
    real_save = torch.save

    def disk_full(obj, f):  # half the bytes reach the temporary file, then the disk is full
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_save({"step": 2, "x": torch.zeros(1000)}, path)
    assert ckpt.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# A run in which every RNG and every piece of state matters to the result: a 2-block student with drop path (draws
# from torch's global RNG each step), fp16 with a GradScaler whose scale moves every step (growth interval 1: it
# doubles until gradients overflow, then halves, and overflowing steps are skipped), gradient accumulation and
# DataLoader workers. A resume that lost any of these states would not end on the same weights.
RICH = ["--set", "train.precision='fp16'", "--set", "train.accum_steps=2", "--set", "train.num_workers=2",
        "--set", "student.model_kwargs={img_size = 16, patch_size = 4, embed_dim = 24, depth = 2, num_heads = 2}",
        "--set", "student.drop_path_rate=0.2"]
RICH_HOOKS = {"KDFORGE_TEST_SCALER_GROWTH_INTERVAL": "1"}


@pytest.fixture(scope="module")
def uninterrupted_rich(tmp_path_factory):
    out = tmp_path_factory.mktemp("rich")
    run_cli("--output-dir", out, *RICH, env_extra=RICH_HOOKS)
    return out


def test_resume_is_exact_with_drop_path_fp16_accumulation_and_workers(uninterrupted_rich, tmp_path):
    # SIGTERM to the whole process group (workers included) after step 5: mid-epoch (3 steps of 2 micro-batches per
    # epoch), at a moment when the grad scaler's scale is not its initial value.
    hooks = {**RICH_HOOKS, "KDFORGE_TEST_SIGTERM_AT_STEP": "5", "KDFORGE_TEST_SIGTERM_GROUP": "1"}
    res = run_cli("--output-dir", tmp_path, *RICH, env_extra=hooks)
    assert "SIGTERM at step 5" in res.stderr
    state = ckpt.load_run(tmp_path / "last.pt")
    assert state["step"] == 5 and state["batch_in_epoch"] == 4
    assert state["scaler"]["scale"] != torch.amp.GradScaler("cpu").get_scale()
    run_cli("--output-dir", tmp_path, *RICH, "--resume", env_extra=RICH_HOOKS)
    assert_same_weights(weights(tmp_path), weights(uninterrupted_rich))


def _trainer(tmp_path, *overrides) -> Trainer:
    return Trainer(load_recipe(TINY, overrides=["eval.before=false", *overrides]), tmp_path, show_progress=False)


def test_loss_weights_scale_each_term_in_the_total_and_in_the_gradients(tmp_path):
    # Each head read by one loss only (by default the feature loss projects the CLS row with the token head).
    own = "losses.feature.cls='own_head'"
    weighted = _trainer(tmp_path / "a", own, "losses.token.weight=2.5", "losses.feature.weight=0.5",
                        "losses.patch.weight=0")
    plain = _trainer(tmp_path / "b", own)  # same seed: same initial weights, same first batch and mask
    batch = next(iter(weighted._loader()))
    loss, terms = weighted.forward_backward(batch)  # 0-d tensors on the device: read here, not in the step
    loss, terms = float(loss), {k: float(v) for k, v in terms.items()}
    assert loss == pytest.approx(2.5 * terms["token"] + 0.5 * terms["feature"], rel=1e-6)
    assert terms["patch"] > 0  # computed and logged, yet weight 0 keeps it out of the total ...
    patch_head = weighted.model.losses["patch"].head
    assert all(p.grad is None or not p.grad.any() for p in patch_head.parameters())  # ... and out of the gradients
    plain.forward_backward(batch)
    for label, w in (("token", 2.5), ("feature", 0.5)):
        for p, q in zip(weighted.model.losses[label].head.parameters(), plain.model.losses[label].head.parameters()):
            torch.testing.assert_close(p.grad, w * q.grad, rtol=1e-5, atol=1e-6 * float(q.grad.abs().max()))


def test_each_epoch_reads_every_item_once_in_its_own_seeded_order(tmp_path):
    def orders(trainer) -> list[list[int]]:
        seen: dict[int, list[int]] = {}
        original = trainer.train_step

        def spy(micro):
            for b in micro:
                seen.setdefault(trainer.epoch, []).extend(b["index"].tolist())
            return original(micro)

        trainer.train_step = spy
        trainer.fit()
        return [seen[e] for e in sorted(seen)]

    first = orders(_trainer(tmp_path / "a"))
    assert len(first) == 3 and all(sorted(o) == list(range(48)) for o in first)  # 48 images, batches of 8
    assert first[0] != first[1] and first[1] != first[2] and first[0] != first[2]
    assert orders(_trainer(tmp_path / "b")) == first  # a function of the seed and the epoch
    assert orders(_trainer(tmp_path / "c", "run.seed=4")) != first


def test_cosine_schedule_shape():
    lrs = [cosine_lr(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_lr_scales_with_global_batch():
    r = load_recipe(TINY, overrides=["train.accum_steps=2"])
    t = Trainer(r, "unused", show_progress=False)
    assert t.global_batch == 16 and t.peak_lr == pytest.approx(1e-3 * 16 / 512)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2], ids=["static_graph", "accumulation"])
def test_two_process_ddp_matches_single_process(tmp_path, accum):
    """torchrun with 2 CPU processes (gloo) and 4 images each == 1 process with 8: the same weights. DDP's graph is
    static without accumulation and dynamic with it (no_sync); the last step is a checkpoint step, which every
    process must know (the end of training saves only when it is not)."""
    common = ["--set", "masker={}", "--set", "losses={token = {plugin = 'proteus.token'}, "
              "feature = {plugin = 'proteus.feature'}}", "--set", "student.drop_path_rate=0.0",
              "--set", "train.epochs=1", "--set", f"train.accum_steps={accum}", "--set", "train.checkpoint_every=3",
              "--no-progress"]
    single = tmp_path / "single"
    run_cli("--output-dir", single, *common)
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29516 + accum),
         "-m", "kdforge.cli", "train", str(TINY), "--output-dir", str(ddp), *common, "--set", "train.batch_size=4"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["global_batch"] == 8 * accum and summary["steps"] == 6 // accum
    assert_same_weights(weights(ddp), weights(single), exact=False)


def test_grid_mismatch_fails_at_start_up_unless_resize_is_allowed(tmp_path):
    from kdforge.errors import ShapeError

    mismatch = ["teacher.model_kwargs={img_size = 16, patch_size = 8, embed_dim = 32, depth = 1, num_heads = 2}"]
    with pytest.raises(ShapeError, match="train.resize_teacher_grid = true"):
        Trainer(load_recipe(TINY, overrides=mismatch), tmp_path, show_progress=False)
    r = load_recipe(TINY, overrides=mismatch + ["train.resize_teacher_grid=true", "train.max_steps=2"])
    summary = Trainer(r, tmp_path, show_progress=False).fit()
    assert summary["steps"] == 2 and summary["final_metrics"]["loss/feature"] > 0


@pytest.mark.parametrize("features", ["cls", "mean_patch"])
def test_evaluation_features_are_the_cls_or_the_mean_patch_token(tmp_path, features):
    """eval.features picks the vector the evaluators see, for student and teacher alike."""
    eval_data = "eval.data={plugin = 'procedural', num_train = 8, num_val = 4, image_size = 16}"
    recipe = load_recipe(TINY, overrides=["train.max_steps=1", eval_data, f"eval.features='{features}'",
                                          "eval.evaluators={knn = {plugin = 'knn', k = 3}}", "eval.after=false"])
    trainer = Trainer(recipe, tmp_path, show_progress=False)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student_out, got = trainer.student(images), trainer._student_encoder()(images)
    expected = student_out.cls if features == "cls" else student_out.patches.mean(dim=1)
    torch.testing.assert_close(got, expected)
    seen = []
    from kdforge.eval.knn import KnnEvaluator

    real_run = KnnEvaluator.run

    def spy(self, encoder, *args, **kwargs):
        seen.append(encoder(images))
        return real_run(self, encoder, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KnnEvaluator, "run", spy)
        trainer.fit()
    trainer.close()
    teacher_out = trainer.teacher(images)
    teacher_expected = teacher_out.cls if features == "cls" else teacher_out.patches.mean(dim=1)
    assert len(seen) == 2  # the student before training, then the teacher
    torch.testing.assert_close(seen[1], teacher_expected)


def test_masking_changes_the_patch_loss_only(tmp_path):
    # Proteus' released code: token and feature objectives read the student's output on the clean image, only the
    # patch objective the masked view. Same weights, same batch: masking on or off gives the same token and feature
    # values, and a patch value that is not the clean view's.
    from tolerances import close

    trainer = _trainer(tmp_path, "masker.mask_probability=1.0")
    model = trainer.model.eval()  # no dropout / drop path: the two calls see the same function
    batch = next(iter(trainer._loader()))
    images = batch["image"]
    mask = trainer.masker(images.shape[0], trainer.grid, torch.Generator().manual_seed(0))
    assert mask.any(1).all()
    with torch.no_grad():
        teacher_out = trainer._teacher_forward(images)
        _, on = model(images, mask, teacher_out, batch)
        _, off = model(images, None, teacher_out, batch)
        clean = model.student(images)
        patch_head = model.losses["patch"].head
        clean_patch = torch.mean((patch_head(clean.patches[mask]) - teacher_out.patches[mask]) ** 2)
    for label in ("token", "feature"):
        close(on[label], off[label], torch.float32, msg=label)
    assert float(off["patch"]) == 0.0  # masking off: no masked position
    assert abs(float(on["patch"]) / float(clean_patch) - 1) > 1e-3  # the masked view, not the clean one


def test_repeated_augmentation_gives_consecutive_ranks_the_same_image_under_other_augmentations():
    from kdforge.engine.trainer import EpochSampler, SeededItems

    n, world, repeats = 30, 2, 3
    shards = [list(EpochSampler(n, seed=5, rank=r, world=world, repeats=repeats)) for r in range(world)]
    assert all(len(s) == n // world for s in shards)  # an epoch keeps its length
    merged = [item for pair in zip(*shards) for item in pair]  # global order: rank 0, rank 1, rank 0, ...
    groups = [merged[i : i + repeats] for i in range(0, len(merged), repeats)]
    for g in groups:
        assert len({i for _, i, _ in g}) == 1 and [c for _, _, c in g] == list(range(repeats))
    assert len({g[0][1] for g in groups}) == n // repeats  # n / repeats distinct images per epoch
    assert [i for _, i, _ in EpochSampler(n, 5, repeats=1)] != [i for _, i, _ in EpochSampler(n, 6, repeats=1)]

    class Noise(torch.utils.data.Dataset):  # an "augmentation" drawing from torch, Python and numpy
        def __len__(self):
            return n

        def __getitem__(self, index):
            import random

            import numpy as np

            return (float(torch.rand(())), random.random(), float(np.random.rand()))

    items = SeededItems(Noise(), seed=1)
    copies = [items[(0, 4, c)] for c in range(repeats)]
    assert len(set(copies)) == repeats and all(len(set(c)) == 3 for c in copies)  # each copy its own draws
    assert items[(0, 4, 1)] == copies[1] and items[(0, 4)] == copies[0]  # a function of the key


def test_train_loop_reads_repeated_augmentation_copies(tmp_path):
    trainer = _trainer(tmp_path, "train.repeated_aug=3", "augment.auto_augment='rand-m9-mstd0.5-inc1'",
                       "augment.re_prob=0.25")  # the DeiT pipeline through the engine
    batch = next(iter(trainer._loader()))
    idx = batch["index"].tolist()
    assert idx[0] == idx[1] == idx[2] and idx[3] == idx[4] == idx[5]  # one process: the copies are consecutive
    assert not torch.equal(batch["image"][0], batch["image"][1])  # ... under different augmentations


@pytest.mark.parametrize("recipe", ["proteus.toml", "fd.toml"])
def test_weight_decay_groups_of_the_shipped_smoke_recipes(tmp_path, recipe):
    # By parameter identity, never by name substrings: the loss heads' weights are decayed; Proteus (as released)
    # exempts only 1-D parameters and biases; FD exempts the class token too (and the unused mask token) but decays
    # its shared relative position bias.
    from kdforge.engine.optim import weight_decay_split

    r = load_recipe(REPO / "plugins" / recipe, profile="smoke", overrides=["eval.before=false"])
    trainer = Trainer(r, tmp_path, show_progress=False)
    model = trainer.model
    decay, no_decay = weight_decay_split(model, r.optim.decay_also)
    print(f"{recipe} decayed: {decay}\n{recipe} not decayed: {no_decay}")
    params = dict(model.named_parameters())
    plain_rule = {n for n, p in params.items() if p.ndim <= 1 or n.endswith(".bias")}
    expected = plain_rule if recipe == "proteus.toml" else plain_rule | {"student.model.cls_token", "student.mask_token"}
    assert set(no_decay) == expected
    assert set(decay) == set(params) - expected
    heads = [n for n in params if n.startswith("losses.") and params[n].ndim >= 2]
    assert heads and all(n in decay for n in heads)  # e.g. losses.token.head.linear.weight
    if recipe == "fd.toml":
        assert "student.rel_pos_bias.table" in decay
    else:
        assert {"student.mask_token", "student.model.cls_token", "student.model.pos_embed"} <= set(decay)
    # the optimizer holds exactly these groups
    (g_decay, g_none) = trainer.optimizer.param_groups
    assert [id(p) for p in g_decay["params"]] == [id(params[n]) for n in decay]
    assert [id(p) for p in g_none["params"]] == [id(params[n]) for n in no_decay]
    assert g_decay["weight_decay"] == r.optim.weight_decay and g_none["weight_decay"] == 0.0
