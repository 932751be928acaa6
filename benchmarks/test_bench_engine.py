"""kdforge's train step against a plain PyTorch loop doing the same forward, backward and optimizer step on the
same models and batch (CPU). Goal (issue 2): median overhead of the engine at most 5%, at the full sizes below
(``KDFORGE_BENCH_QUICK=0`` on a CPU machine).

The plain loop is what a user would write by hand: teacher forward, one student forward of the clean and the masked
view, the three Proteus MSE losses with F.mse_loss (feature over [CLS; patches]), backward, AdamW step. The kdforge step adds what the engine does per step
(schedule, mask generation, finiteness check, grad scaler, metrics) and computes the losses through
kdforge.ops. The two run in interleaved rounds (``harness.compare``: a shared CPU drifts more than 5% between
two separate timings); the table gives both medians and ``speedup`` = plain / kdforge with the middle half of the
rounds, so overhead = 1 / speedup - 1, and the goal verdict is judged on those rounds. Run:
``KDFORGE_BENCH_QUICK=0 python -m pytest benchmarks/test_bench_engine.py``.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import goals
from benchmarks.harness import compare, pick
from kdforge.engine.optim import param_groups
from kdforge.engine.trainer import Trainer
from kdforge.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
# teacher embed dim and depth, student embed dim and depth, batch size
GOAL_DIMS = (192, 4, 96, 4, 64)
DIMS = pick(quick=(64, 2, 48, 2, 16), full=GOAL_DIMS)


def _label(impl: str, dims: tuple[int, ...]) -> str:
    return "train_step/{}/teacher{}x{}_student{}x{}_batch{}".format(impl, *dims)


goals.overhead(2, "train step, teacher 192x4, student 96x4, batch 64 (CPU): kdforge engine overhead <= 5% over a "
               "plain PyTorch loop", label=_label("kdforge", GOAL_DIMS), anchor=_label("plain_pytorch", GOAL_DIMS),
               at_most=0.05)  # fmt: skip


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(2)
    td, tdepth, sd, sdepth, batch = DIMS
    recipe = load_recipe(REPO / "tests" / "recipes" / "tiny.toml", overrides=[
        f"teacher.model_kwargs={{img_size = 32, patch_size = 4, embed_dim = {td}, depth = {tdepth}, num_heads = 4}}",
        f"student.model_kwargs={{img_size = 32, patch_size = 4, embed_dim = {sd}, depth = {sdepth}, num_heads = 4}}",
        "student.drop_path_rate=0.0", "augment.image_size=32", "data.image_size=32", f"data.num_train={batch * 2}",
        f"train.batch_size={batch}", "optim.clip_grad=0.0",
    ])
    trainer = Trainer(recipe, tmp_path_factory.mktemp("bench"), show_progress=False)
    trainer._skips = None
    batch = next(iter(trainer._loader()))
    g = torch.Generator().manual_seed(0)
    mask = trainer.masker(batch["image"].shape[0], trainer.grid, g)
    return trainer, batch, mask


def test_train_step_overhead(engine):
    trainer, batch, mask = engine
    model = trainer.model
    heads = {k: model.losses[k].head for k in ("token", "feature", "patch")}
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-5)

    def plain_step():
        opt.zero_grad(set_to_none=True)
        images = batch["image"]
        b = images.shape[0]
        t = trainer.teacher(images)
        # the two student views in one forward, as the released code does: clean (token, feature), masked (patch)
        both = model.student(torch.cat([images, images]), mask=torch.cat([torch.zeros_like(mask), mask]))
        cls, patches, masked = both.cls[:b], both.patches[:b], both.patches[b:]
        loss = F.mse_loss(heads["token"](cls), t.cls)
        rows = torch.cat([heads["token"](cls)[:, None], heads["feature"](patches)], dim=1)
        loss = loss + F.mse_loss(rows, torch.cat([t.cls[:, None], t.patches], dim=1))
        loss = loss + F.mse_loss(heads["patch"](masked[mask]), t.patches[mask])
        loss.backward()
        opt.step()

    compare(_label("kdforge", DIMS), lambda: trainer.train_step([batch]), anchor=_label("plain_pytorch", DIMS),
            anchor_fn=plain_step, group="engine_overhead", device=torch.device("cpu"), rounds=pick(5, 11),
            calls=pick(1, 2), warmup=2)
