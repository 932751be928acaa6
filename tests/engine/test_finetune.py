"""Supervised stages on the distillation engine: layer-wise lr decay, Mixup / CutMix, label smoothing, a student
started from a distillation run (``[student] init_from``), recipes without a teacher, and FD's fine-tuning
evaluation end to end (plugins/fd_finetune.toml from the FD smoke run, against the same student from scratch)."""

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import kdforge
from torch import nn

from kdforge.data.transforms import BatchMix, TransformConfig
from kdforge.engine import checkpoint as ckpt
from kdforge.engine.optim import param_groups
from kdforge.engine.trainer import Trainer
from kdforge.errors import RecipeError
from kdforge.losses.supervised import SupervisedCELoss
from kdforge.recipe import load_recipe
from kdforge.students import StudentOutput
from kdforge.students.timm_student import TimmStudent

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "recipes" / "tiny.toml"
TINY_FT = REPO / "tests" / "recipes" / "tiny_finetune.toml"
FD_FT = REPO / "plugins" / "fd_finetune.toml"


# ----------------------------------------------------------------------------------------------- layer-wise lr decay
def _expected_layer(name: str, depth: int) -> int:
    """FD's released get_vit_layer, written out for kdforge's names: 0 embeddings, b + 1 block b, depth + 1 the rest."""
    block = re.match(r"student\.model\.blocks\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    if name in ("student.mask_token", "student.model.cls_token") or name.startswith("student.model.patch_embed."):
        return 0
    return depth + 1


def test_layer_decay_scales_each_group_by_the_formula():
    depth, decay = 3, 0.65
    student = TimmStudent(TimmStudent.Config(
        model="vit_tiny_patch16_224", attention="kdforge", rel_pos_bias="shared",
        model_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": depth, "num_heads": 2,
                      "pos_embed": "none"}))
    model = nn.ModuleDict({"student": student, "losses": nn.ModuleDict({"ce": nn.Linear(24, 5)})})
    groups = param_groups(model, 0.05, layer_decay=decay)
    group_of = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)
    for name, p in names.items():
        g = group_of[id(p)]
        assert g["lr_scale"] == pytest.approx(decay ** (depth + 1 - _expected_layer(name, depth))), name
    # the embeddings at decay^(L+1), the last block at decay^1, what follows the blocks (final norm, the shared
    # relative position bias as in FD's released code, the loss head) at the full lr
    assert group_of[id(names["student.model.patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(decay ** 4)
    assert group_of[id(names[f"student.model.blocks.{depth - 1}.mlp.fc1.weight"])]["lr_scale"] == pytest.approx(decay)
    for top in ("student.model.norm.weight", "student.rel_pos_bias.table", "losses.ce.weight"):
        assert group_of[id(names[top])]["lr_scale"] == 1.0
    # weight decay is still decided by identity, not by the layer
    wd = {n: group_of[id(p)]["weight_decay"] for n, p in names.items()}
    assert wd["student.model.blocks.0.attn.qkv.weight"] == 0.05 and wd["losses.ce.weight"] == 0.05
    assert wd["student.model.cls_token"] == 0.0 and wd["student.rel_pos_bias.table"] == 0.0
    assert wd["student.mask_token"] == 0.0 and wd["student.model.blocks.0.attn.qkv.bias"] == 0.0
    # layer_decay = 1 keeps the two groups of before, with no per-group scale
    plain = param_groups(model, 0.05)
    assert len(plain) == 2 and all("lr_scale" not in g for g in plain)


def test_layer_decay_needs_a_student_that_numbers_its_layers():
    with pytest.raises(RecipeError, match="layer_decay = 0.5 needs one student"):
        param_groups(nn.Sequential(nn.Linear(3, 3)), 0.05, layer_decay=0.5)


# ----------------------------------------------------------------------------------------------- Mixup / CutMix
def _mixes(seed, x, labels, c):
    return BatchMix(TransformConfig(image_size=8, mixup=0.8, cutmix=1.0), c)(x.clone(), labels, seed=seed)


def test_mixup_and_cutmix_are_applied_and_reproducible():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])  # image i and its partner 5 - i (the batch reversed) differ
    numpy_state = np.random.get_state()[1].copy()
    kinds = set()
    for seed in range(12):
        mixed, target = _mixes(seed, x, labels, 4)
        again, target_again = _mixes(seed, x, labels, 4)
        assert torch.equal(mixed, again) and torch.equal(target, target_again)  # a seed gives one mix
        torch.testing.assert_close(target.sum(1), torch.ones(6))
        lam = float(target[0, labels[0]])  # the weight of each image's own label; 1 - lam goes to its partner's
        torch.testing.assert_close(target, lam * F.one_hot(labels, 4) + (1 - lam) * F.one_hot(labels.flip(0), 4))
        if lam == 1.0:
            assert torch.equal(mixed, x)
            continue
        if torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6):
            kinds.add("mixup")
        else:  # CutMix: a box of the partner image pasted in, the label weights are the area fractions
            from_partner = (mixed == x.flip(0)) & (mixed != x)
            assert bool(((mixed == x) | (mixed == x.flip(0))).all())
            assert float(from_partner[0].float().mean()) == pytest.approx(1 - lam, abs=1e-6)
            kinds.add("cutmix")
    assert kinds == {"mixup", "cutmix"}  # mix_switch_prob 0.5: both happen over a few seeds
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # numpy's global generator is left alone


def test_engine_mixes_the_batch_before_the_forward_and_scales_lr_per_layer(tmp_path):
    trainer = Trainer(load_recipe(TINY_FT), tmp_path / "run", show_progress=False)
    seen = {}

    def record(images, mask, teacher_out, batch, unmixed=None):
        seen.update(images=images.clone(), target=batch["target"].clone(), teacher_out=teacher_out)
        return sum(p.sum() for p in trainer.model.parameters()) * 0.0, {"ce": torch.tensor(1.0)}

    trainer.forward_model = record
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    batch = {"image": x.clone(), "label": labels, "index": torch.arange(8), "skipped": []}
    trainer.step = 5
    trainer.forward_backward(batch, micro_index=0)
    seed = (3 * 1_000_003 + 5 * 1009) % (2**63)
    expected, target = BatchMix(trainer.recipe.augment, 4)(x.clone(), labels, seed=seed)
    assert not torch.equal(seen["images"], x)
    assert torch.equal(seen["images"], expected) and torch.equal(seen["target"], target)
    assert seen["teacher_out"] is None and trainer.teacher is None  # no teacher: no teacher forward
    # a step sets each group's lr to the scheduled lr times the group's layer scale (optim.layer_decay = 0.6)
    metrics = trainer.train_step([batch])
    lrs = {(g["lr_scale"], g["lr"]) for g in trainer.optimizer.param_groups}
    assert {scale for scale, _ in lrs} == {0.6**2, 0.6, 1.0}  # depth 1: embeddings, block 0, the rest
    for scale, lr in lrs:
        assert lr == pytest.approx(metrics["lr"] * scale)


# ----------------------------------------------------------------------------------------------- label smoothing
def test_label_smoothing_matches_the_float64_formula():
    torch.manual_seed(0)
    c, eps = 5, 0.1
    loss_fn = SupervisedCELoss(SupervisedCELoss.Config(label_smoothing=eps, head_init_scale=1.0), student_dim=8,
                               teacher_dim=None, num_classes=c)
    out = StudentOutput(cls=torch.randn(4, 8), patches=torch.randn(4, 6, 8) * 3, grid=(2, 3))
    labels = torch.tensor([0, 4, 2, 2])
    loss, _ = loss_fn(out, None, {"label": labels})
    logits = loss_fn.head.linear(F.layer_norm(out.patches.mean(1), (8,), loss_fn.head.fc_norm.weight,
                                              loss_fn.head.fc_norm.bias)).detach().double()
    logp = torch.log_softmax(logits, dim=1)
    expected = (-(1 - eps) * logp[torch.arange(4), labels] - eps / c * logp.sum(1)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    # mixed targets: the smoothing applies to them the same way (what timm's Mixup does with label_smoothing)
    lam = 0.3
    soft = lam * F.one_hot(labels, c).double() + (1 - lam) * F.one_hot(labels.flip(0), c).double()
    mixed, _ = loss_fn(out, None, {"label": labels, "target": soft.float()})
    expected_mixed = (-((1 - eps) * soft + eps / c) * logp).sum(1).mean()
    assert float(mixed.detach()) == pytest.approx(float(expected_mixed), rel=1e-6)


# ----------------------------------------------------------------------------------------------- init_from
@pytest.fixture
def tiny_distill_run(tiny_two_step_run):
    return tiny_two_step_run


def test_init_from_loads_exactly_the_runs_student(tiny_distill_run, tmp_path):
    saved = ckpt.load_run(tiny_distill_run / "last.pt")["model"]
    run_student = {k.removeprefix("student."): v for k, v in saved.items() if k.startswith("student.")}
    assert any(k.startswith("losses.") for k in saved)  # the run's heads exist but must not come along
    recipe = load_recipe(TINY_FT, overrides=[f"student.init_from={tiny_distill_run}"])
    trainer = Trainer(recipe, tmp_path / "ft", show_progress=False)
    loaded = trainer.student.state_dict()
    assert loaded.keys() == run_student.keys()
    for k, v in run_student.items():
        assert torch.equal(loaded[k], v), k
    scratch = Trainer(load_recipe(TINY_FT), tmp_path / "scratch", show_progress=False).student.state_dict()
    assert not torch.equal(scratch["model.blocks.0.attn.qkv.weight"], run_student["model.blocks.0.attn.qkv.weight"])
    # the fine-tuning's own head is the same whether the student came from the run or not
    torch.testing.assert_close(trainer.model.losses["ce"].head.linear.weight,
                               Trainer(load_recipe(TINY_FT), tmp_path / "s2", show_progress=False)
                               .model.losses["ce"].head.linear.weight)


def test_init_from_refuses_another_architecture(tiny_distill_run, tmp_path):
    res = kdforge("train", TINY_FT, "--output-dir", tmp_path / "ft", "--no-progress",
                  "--set", f"student.init_from={tiny_distill_run}", "--set",
                  "student.model_kwargs={img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2}")
    assert res.returncode == 2, res.stderr
    assert "does not fit the recipe's [student]" in res.stderr
    assert "model.cls_token (1, 1, 24) vs (1, 1, 32)" in res.stderr, res.stderr
    assert not (tmp_path / "ft").exists()  # refused before anything was written
    res = kdforge("train", TINY_FT, "--output-dir", tmp_path / "ft", "--no-progress",
                  "--set", f"student.init_from={tmp_path / 'missing'}")
    assert res.returncode == 2 and "no such run directory" in res.stderr, res.stderr


# ----------------------------------------------------------------------------------------------- teacher-free recipes
def test_a_distillation_loss_without_a_teacher_is_refused():
    with pytest.raises(RecipeError, match=r"losses.feature \(fd.feature\) distils a teacher but the recipe has no"):
        load_recipe(TINY_FT, overrides=["losses.feature={plugin='fd.feature'}"])


def test_supervised_stage_trains_and_reports_top1(tmp_path):
    res = kdforge("train", TINY_FT, "--output-dir", tmp_path / "ft", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert 0 <= summary["student_classifier_top1_after"] <= 100 and "loss/ce" in summary["final_metrics"]
    assert not any(k.startswith("teacher_") for k in summary)


# ----------------------------------------------------------------------------------------------- FD end to end
def _finetune(out: Path, init_from: str) -> tuple[dict, float]:
    t0 = time.time()
    res = kdforge("train", FD_FT, "--profile", "smoke", "--output-dir", out, "--no-progress",
                  "--set", f"student.init_from={init_from}", timeout=1800)
    wall = time.time() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), wall


@pytest.mark.slow
def test_fd_finetune_smoke_from_the_distilled_student_and_from_scratch(fd_smoke_run, tmp_path):
    distilled, t_distilled = _finetune(tmp_path / "distilled", str(fd_smoke_run))
    scratch, t_scratch = _finetune(tmp_path / "scratch", "none")
    a, b = distilled["student_classifier_top1_after"], scratch["student_classifier_top1_after"]
    print(f"fd_finetune smoke: classifier top-1 {a:.2f} from the FD smoke run ({t_distilled:.0f} s), "
          f"{b:.2f} from scratch ({t_scratch:.0f} s), same data, seed and {distilled['steps']} steps")
    assert distilled["steps"] == scratch["steps"] > 0
    # measured (seeds 0 and 1): 29.5 / 28.2 % from the FD smoke run (its kNN top-1: 44 %), 10.1 / 10.6 % from
    # scratch (chance: 10 classes, 60 steps under Mixup / CutMix are too few for a random student)
    assert a > b + 10, (a, b)
    recipe = (tmp_path / "distilled" / "recipe.toml").read_text()
    assert str(fd_smoke_run) in recipe  # the run records where its student came from


def test_a_shared_relative_position_bias_starts_every_blocks_own():
    """FD's released fine-tuning turns the distilled shared bias into one per block, each starting from it."""
    from kdforge.engine.runs import load_student_state

    def student(rel_pos_bias):
        return TimmStudent(TimmStudent.Config(
            model="vit_tiny_patch16_224", attention="kdforge", rel_pos_bias=rel_pos_bias,
            model_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2,
                          "pos_embed": "none"}))

    torch.manual_seed(0)
    shared = student("shared")
    with torch.no_grad():
        shared.rel_pos_bias.table.normal_()
    state = {"model": {f"student.{k}": v for k, v in shared.state_dict().items()}, "recipe": {}}
    per_block = student("per_block")
    load_student_state(per_block, state, "does not fit", "fix it")
    for b in range(2):
        assert torch.equal(per_block.rel_pos_biases[b].table, shared.rel_pos_bias.table)
    assert torch.equal(per_block.model.blocks[1].attn.qkv.weight, shared.model.blocks[1].attn.qkv.weight)
