"""kdforge's train step against a plain PyTorch loop doing the same forward, backward and optimizer step on the
same models and batch (CPU). Goal (issue 2): median overhead of the engine at most 5%.

The plain loop is what a user would write by hand: teacher forward, student forward on the masked view, the three
Proteus MSE losses with F.mse_loss, backward, AdamW step. The kdforge step adds what the engine does per step
(schedule, mask generation, finiteness check, grad scaler, metrics) and computes the losses through
kdforge.ops. Run: ``python -m pytest benchmarks/test_bench_engine.py``; the table at the end gives both medians
and ``speedup`` = plain / kdforge, so overhead = 1 / speedup - 1.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import measure, pick
from kdforge.engine.trainer import Trainer, _param_groups
from kdforge.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(2)
    dims = pick(quick=(64, 2, 48, 2, 16), full=(192, 4, 96, 4, 64))
    td, tdepth, sd, sdepth, batch = dims
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


def test_plain_pytorch_step(benchmark, engine):
    trainer, batch, mask = engine
    model = trainer.model
    heads = {k: model.losses[k].head for k in ("token", "feature", "patch")}
    opt = torch.optim.AdamW(_param_groups(model, 0.05), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        images = batch["image"]
        t = trainer.teacher(images)
        s = model.student(images, mask=mask)
        loss = F.mse_loss(heads["token"](s.cls), t.cls)
        loss = loss + F.mse_loss(heads["feature"](s.patches), t.patches)
        loss = loss + F.mse_loss(heads["patch"](s.patches[mask]), t.patches[mask])
        loss.backward()
        opt.step()

    measure(benchmark, step, label="train_step/plain_pytorch", group="engine_overhead", rounds=pick(5, 30),
            warmup=2)


def test_kdforge_train_step(benchmark, engine):
    trainer, batch, _ = engine
    measure(benchmark, lambda: trainer.train_step([batch]), label="train_step/kdforge", group="engine_overhead",
            anchor="train_step/plain_pytorch", rounds=pick(5, 30), warmup=2)
