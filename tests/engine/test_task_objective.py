"""Task-oriented distillation's objective on the engine (papers/002 eq. 2-4): KL between temperature-softened
teacher and student logits (x T^2) on every image plus weighted CE on the labelled ones, and mixing that reaches
only the KL term (the CE term reads the image before Mixup / CutMix: the "unmixed" view)."""

import math
from pathlib import Path

import torch
from torch import nn

from kdforge.engine.trainer import DistillModule, Trainer
from kdforge.losses.supervised import SupervisedCELoss
from kdforge.losses.task import DistillKLLoss
from kdforge.recipe import load_recipe
from kdforge.students import StudentOutput
from kdforge.teachers import TeacherOutput

REPO = Path(__file__).resolve().parents[2]
TINY_FT = REPO / "tests" / "recipes" / "tiny_finetune.toml"


class LogitStudent(nn.Module):
    """A student whose logits are a fixed linear map of the image's mean colour: what each view's rows were fed is
    readable from its logits."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -1.0]]))
            self.linear.bias.zero_()
        self.calls = []

    def forward(self, images, mask=None):
        self.calls.append(images.clone())
        colour = images.mean(dim=(2, 3))
        return StudentOutput(cls=colour, patches=colour[:, None], grid=(1, 1), logits=self.linear(colour))


def _build(kl_weight=1.0, ce_weight=0.5, temperature=2.0):
    kl = DistillKLLoss(DistillKLLoss.Config(temperature=temperature), student_dim=3, teacher_dim=3)
    ce = SupervisedCELoss(SupervisedCELoss.Config(head="student", unlabelled="ignore", view="unmixed"),
                          student_dim=3, teacher_dim=None, num_classes=3)
    return DistillModule(LogitStudent(), {"kl": kl, "ce": ce}, {"kl": kl_weight, "ce": ce_weight})


def _log_softmax(row):
    m = max(row)
    z = math.log(sum(math.exp(v - m) for v in row)) + m
    return [v - z for v in row]


def test_kl_plus_ce_is_the_hand_computed_sum_with_unlabelled_items_ignored():
    model = _build(kl_weight=1.0, ce_weight=0.5, temperature=2.0)
    # images of constant colour: the student's logits are (r, 2g, -b)
    colours = torch.tensor([[0.2, 0.5, 0.1], [0.9, 0.1, 0.4], [0.3, 0.3, 0.8]], dtype=torch.float64)
    images = colours[:, :, None, None].expand(3, 3, 2, 2).clone()
    teacher_logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [-1.0, 3.0, 0.0]], dtype=torch.float64)
    teacher = TeacherOutput(cls=teacher_logits, patches=teacher_logits[:, None], grid=(1, 1), logits=teacher_logits)
    labels = torch.tensor([2, -1, 0])  # the second image is unlabelled
    batch = {"image": images, "label": labels, "index": torch.arange(3), "skipped": []}
    total, terms = model(images, None, teacher, batch)

    student = [[c[0], 2 * c[1], -c[2]] for c in colours.tolist()]
    t = 2.0
    kl = 0.0
    for s_row, t_row in zip(student, teacher_logits.tolist()):
        log_p = _log_softmax([v / t for v in t_row])
        log_q = _log_softmax([v / t for v in s_row])
        kl += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    kl = t * t * kl / 3  # x T^2, averaged over every image, labelled or not
    ce = -(_log_softmax(student[0])[2] + _log_softmax(student[2])[0]) / 2  # the two labelled images only
    assert abs(float(terms["kl"]) - kl) <= 1e-12 * abs(kl)
    assert abs(float(terms["ce"]) - ce) <= 1e-6 * abs(ce)  # supervised.ce computes in float32
    assert abs(float(total) - (kl + 0.5 * ce)) <= 1e-6 * (kl + 0.5 * ce)  # the engine sums in float32


def test_mixing_reaches_only_the_distillation_term():
    model = _build(temperature=1.0)
    colours = torch.tensor([[0.2, 0.5, 0.1], [0.9, 0.1, 0.4]], dtype=torch.float64)
    unmixed = colours[:, :, None, None].expand(2, 3, 2, 2).clone()
    mixed = 0.7 * unmixed + 0.3 * unmixed.flip(0)
    teacher_logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]], dtype=torch.float64)
    teacher = TeacherOutput(cls=teacher_logits, patches=teacher_logits[:, None], grid=(1, 1), logits=teacher_logits)
    batch = {"image": mixed, "label": torch.tensor([1, 0]), "index": torch.arange(2), "skipped": []}
    _, terms = model(mixed, None, teacher, batch, unmixed)
    # one student forward of [mixed; unmixed]
    assert len(model.student.calls) == 1 and torch.equal(model.student.calls[0], torch.cat([mixed, unmixed]))
    s_unmixed = model.student(unmixed).logits
    s_mixed = model.student(mixed).logits
    ce = torch.nn.functional.cross_entropy(s_unmixed, torch.tensor([1, 0]))
    kl = torch.nn.functional.kl_div(s_mixed.log_softmax(1), teacher_logits.log_softmax(1), log_target=True,
                                    reduction="batchmean")
    assert torch.allclose(terms["ce"].double(), ce.detach(), rtol=1e-6)
    assert torch.allclose(terms["kl"].double(), kl.detach(), rtol=1e-6)
    # without mixing the unmixed view is the clean one: one forward of the batch alone
    model.student.calls.clear()
    model(unmixed, None, teacher, dict(batch, image=unmixed))
    assert len(model.student.calls) == 1 and torch.equal(model.student.calls[0], unmixed)


def test_the_trainer_gives_the_unmixed_images_to_the_unmixed_view_and_makes_no_targets(tmp_path):
    """Mixup on, CE on the unmixed view: the teacher and the clean view see the mixed batch, the CE loss the images
    before mixing, and no mixed targets are made (none is read); unlabelled items pass."""
    recipe = load_recipe(TINY_FT, overrides=["losses.ce.view='unmixed'", "losses.ce.unlabelled='ignore'"])
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
    assert trainer.mix is not None and trainer.keep_unmixed and not trainer.mix_targets
    seen = {}

    def record(images, mask, teacher_out, batch, unmixed=None):
        seen.update(images=images.clone(), unmixed=unmixed.clone(), batch=batch)
        return sum(p.sum() for p in trainer.model.parameters()) * 0.0, {"ce": torch.tensor(1.0)}

    trainer.forward_model = record
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, -1, 3, -1, 1, 2, 3])  # unlabelled items are allowed: CE ignores them
    trainer.step = 5
    trainer.forward_backward({"image": x.clone(), "label": labels, "index": torch.arange(8), "skipped": []})
    assert torch.equal(seen["unmixed"], x)
    assert not torch.allclose(seen["images"], x)  # mixed
    assert "target" not in seen["batch"]
