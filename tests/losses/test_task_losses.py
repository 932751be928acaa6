"""The losses of task-specific distillation against their formulas, written out by hand in float64.

distill.kl (papers/002 eq. 3-4): T^2 KL(softmax(t/T) || softmax(s/T)), the mean over every item of the batch.
supervised.ce with unlabelled items ignored, on the student's own classifier, on the unmixed view. contrastive.global
(papers/001 A.4): InfoNCE of projected, L2-normalised CLS tokens with in-batch negatives. cosine.patch (papers/001
A.4): the mean over patches of 1 - cos(projected student patch, teacher patch). No F.kl_div, F.cross_entropy,
F.log_softmax or F.cosine_similarity on the expected side: a loss that drops T^2, sums instead of averaging, reads
the wrong direction or lets the teacher get gradients fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.errors import DataError, RecipeError, ShapeError
from kdforge.losses import DistillLoss
from kdforge.plugins import create
from kdforge.students import StudentOutput
from kdforge.teachers import TeacherOutput
from tolerances import close

B, N, DS, DT, C = 4, 5, 6, 7, 3


def _loss(plugin, *, teacher_dim=DT, **cfg):
    """The loss, its parameters drawn from a generator of their own (not the global RNG, whose state depends on the
    tests that ran before), with non-trivial biases."""
    extra = {"num_classes": C} if plugin == "supervised.ce" else {}
    fn = create("losses", {"plugin": plugin, **cfg}, "loss", student_dim=DS, teacher_dim=teacher_dim, **extra)
    params = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in fn.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=params))
    return fn


def _student(gen, logits=None, b=B):
    return StudentOutput(cls=torch.randn(b, DS, generator=gen, dtype=torch.float64, requires_grad=True),
                         patches=torch.randn(b, N, DS, generator=gen, dtype=torch.float64, requires_grad=True),
                         grid=(1, N), logits=logits)


def _teacher(gen, logits=None, b=B):
    """Teacher outputs that require grad, so a loss that does not detach them shows it."""
    return TeacherOutput(cls=(3 * torch.randn(b, DT, generator=gen, dtype=torch.float64)).requires_grad_(),
                         patches=torch.randn(b, N, DT, generator=gen, dtype=torch.float64).requires_grad_(),
                         grid=(1, N), logits=logits)


# ---- the formulas, by hand ----
def log_softmax(x):
    shifted = x - x.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def l2_normalise(x):
    return x / (x**2).sum(dim=-1, keepdim=True).sqrt()


def linear(layer, x):
    return x @ layer.weight.T + layer.bias


# ---- distill.kl ----
def test_distill_kl_closed_form_with_temperature_two():
    """Two classes, T = 2, logits chosen so that every softmax is a simple fraction:
    item 0: teacher [0, 2 ln 3] -> p_t = [1/4, 3/4]; student [0, 0] -> p_s = [1/2, 1/2];
    item 1: teacher [0, 0] -> [1/2, 1/2]; student [2 ln 3, 0] -> [3/4, 1/4]; item 2: both equal -> KL 0.
    Loss = T^2 * mean over the 3 items of sum_c p_t log(p_t / p_s)."""
    ln3 = math.log(3.0)
    t = torch.tensor([[0.0, 2 * ln3], [0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0], [2 * ln3, 0.0], [1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    expected = 2.0**2 * (kl0 + kl1 + 0.0) / 3
    fn = _loss("distill.kl", temperature=2.0)
    cls, patches = torch.zeros(3, DS, dtype=torch.float64), torch.zeros(3, N, DS, dtype=torch.float64)
    loss, _ = fn(StudentOutput(cls, patches, (1, N), logits=s),
                 TeacherOutput(torch.zeros(3, DT), torch.zeros(3, N, DT), (1, N), logits=t),
                 {"label": torch.tensor([-1, 1, -1])})  # unlabelled items count like the labelled one
    assert loss.dtype == torch.float64
    close(loss.detach(), torch.tensor(expected, dtype=torch.float64), torch.float64)
    # T^2 matters: the same logits at T = 1 give another value (p_t = [1/10, 9/10] for item 0)
    at_one, _ = _loss("distill.kl")(StudentOutput(cls, patches, (1, N), logits=s),
                                    TeacherOutput(torch.zeros(3, DT), torch.zeros(3, N, DT), (1, N), logits=t), {})
    kl0_t1 = 0.1 * math.log(0.1 / 0.5) + 0.9 * math.log(0.9 / 0.5)
    kl1_t1 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    close(at_one.detach(), torch.tensor((kl0_t1 + kl1_t1) / 3, dtype=torch.float64), torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_distill_kl_matches_the_formula_and_its_gradient(gen, temperature):
    s_logits = (3 * torch.randn(B, C, generator=gen, dtype=torch.float64)).requires_grad_()
    t_logits = (3 * torch.randn(B, C, generator=gen, dtype=torch.float64)).requires_grad_()
    s, t = _student(gen, s_logits), _teacher(gen, t_logits)
    loss, _ = _loss("distill.kl", temperature=temperature)(s, t, {})
    log_ps, log_pt = log_softmax(s_logits / temperature), log_softmax(t_logits.detach() / temperature)
    expected = temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    close(loss.detach(), expected.detach(), torch.float64)
    close(torch.autograd.grad(loss, s_logits, retain_graph=True)[0],
          torch.autograd.grad(expected, s_logits)[0], torch.float64)
    loss.backward()
    assert t_logits.grad is None, "distill.kl let gradients reach the teacher's logits"


def test_distill_kl_computes_half_precision_logits_in_float32(gen):
    s_logits = torch.randn(B, C, generator=gen, dtype=torch.float64)
    t_logits = torch.randn(B, C, generator=gen, dtype=torch.float64)
    s = _student(gen, s_logits.bfloat16())
    loss, _ = _loss("distill.kl", temperature=2.0)(s, _teacher(gen, t_logits.bfloat16()), {})
    assert loss.dtype == torch.float32
    log_ps = log_softmax(s_logits.bfloat16().double() / 2)
    log_pt = log_softmax(t_logits.bfloat16().double() / 2)
    close(loss, (4 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()).float(), torch.float32)


def test_distill_kl_errors_say_what_to_do(gen):
    fn = _loss("distill.kl")
    with pytest.raises(ShapeError, match=r"student gives no logits.*student.num_classes = C"):
        fn(_student(gen), _teacher(gen, torch.randn(B, C)), {})
    with pytest.raises(ShapeError, match=r"teacher gives no logits.*plugin = \"adapted\""):
        fn(_student(gen, torch.randn(B, C)), _teacher(gen), {})
    with pytest.raises(ShapeError, match=r"student's classifier has 5 classes but the teacher's has 3"):
        fn(_student(gen, torch.randn(B, 5)), _teacher(gen, torch.randn(B, 3)), {})
    assert fn.reads_teacher and not fn.needs_labels


# ---- supervised.ce: unlabelled items, the student's classifier, the view ----
def _ce_rows(logits, labels, smoothing):
    target = torch.full_like(logits, smoothing / logits.shape[-1])
    target[torch.arange(len(labels)), labels] += 1 - smoothing
    return -(target * log_softmax(logits)).sum(-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_ignores_unlabelled_items(gen, smoothing):
    logits = (2 * torch.randn(B, C, generator=gen, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([2, -1, 0, -1])
    fn = _loss("supervised.ce", head="student", unlabelled="ignore", label_smoothing=smoothing)
    assert fn.ignores_unlabelled and not _loss("supervised.ce").ignores_unlabelled
    assert DistillLoss.ignores_unlabelled is False
    loss, _ = fn(_student(gen, logits), None, {"label": labels})
    rows = _ce_rows(logits[[0, 2]], torch.tensor([2, 0]), smoothing)  # items 0 and 2 only
    expected = (rows[0] + rows[1]) / 2
    close(loss.double(), expected.detach(), torch.float32)  # supervised.ce computes in float32
    grad = torch.autograd.grad(loss, logits)[0]
    assert grad[[1, 3]].abs().max() == 0, "unlabelled items must contribute nothing"
    close(grad.double(), torch.autograd.grad(expected, logits)[0], torch.float32)


def test_ce_ignores_unlabelled_items_of_mixed_targets_too(gen):
    logits = torch.randn(B, C, generator=gen, dtype=torch.float64)
    target = torch.softmax(torch.randn(B, C, generator=gen, dtype=torch.float64), -1)
    labels = torch.tensor([-1, 1, 1, -1])
    loss, _ = _loss("supervised.ce", head="student", unlabelled="ignore")(
        _student(gen, logits), None, {"label": labels, "target": target})
    expected = -(target[[1, 2]] * log_softmax(logits[[1, 2]])).sum(-1).mean()
    close(loss.double(), expected, torch.float32)


def test_ce_without_labelled_items_is_a_zero_in_the_graph(gen):
    fn = _loss("supervised.ce", unlabelled="ignore").double()  # its own head: the head must still take part in backward
    s = _student(gen)
    loss, _ = fn(s, None, {"label": torch.full((B,), -1)})
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in fn.parameters())
    assert s.patches.grad is not None and s.patches.grad.abs().max() == 0


def test_ce_refuses_unlabelled_items_by_default(gen):
    fn = _loss("supervised.ce", head="student")
    with pytest.raises(DataError, match=r"2 unlabelled items.*unlabelled = \"ignore\""):
        fn(_student(gen, torch.randn(B, C)), None, {"label": torch.tensor([0, -1, 1, -1])})


def test_ce_on_the_students_classifier_reads_its_logits(gen):
    logits = torch.randn(B, C, generator=gen, dtype=torch.float64, requires_grad=True)
    s = _student(gen, logits)
    fn = _loss("supervised.ce", head="student", label_smoothing=0.1)
    assert list(fn.parameters()) == [], "head = 'student' builds no head of its own"
    assert fn.predict(s) is logits
    labels = torch.tensor([1, 0, 2, 2])
    loss, _ = fn(s, None, {"label": labels})
    close(loss.double(), _ce_rows(logits, labels, 0.1).mean().detach(), torch.float32)
    loss.backward()
    assert logits.grad is not None and s.cls.grad is None and s.patches.grad is None
    with pytest.raises(ShapeError, match=r"student gives none.*student.num_classes = 3"):
        fn(_student(gen), None, {"label": labels})
    with pytest.raises(ShapeError, match=r"3 classes but the student's logits are \(4, 5\)"):
        fn(_student(gen, torch.randn(B, 5)), None, {"label": labels})


def test_ce_view_is_an_instance_attribute_and_unmixed_reads_the_labels(gen):
    assert DistillLoss.view == "clean"
    clean, unmixed = _loss("supervised.ce", head="student"), _loss("supervised.ce", head="student", view="unmixed")
    assert clean.view == "clean" and unmixed.view == "unmixed"
    logits = torch.randn(B, C, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1])
    mixed = torch.softmax(torch.randn(B, C, generator=gen, dtype=torch.float64), -1)
    batch = {"label": labels, "target": mixed}
    from_labels = _ce_rows(logits, labels, 0.0).mean()
    from_mixed = -(mixed * log_softmax(logits)).sum(-1).mean()
    assert abs(float(from_labels - from_mixed)) > 1e-2  # the case tells the two apart
    close(unmixed(_student(gen, logits), None, batch)[0].double(), from_labels, torch.float32)
    close(clean(_student(gen, logits), None, batch)[0].double(), from_mixed, torch.float32)


# ---- contrastive.global ----
def _info_nce(s, t, temperature):
    """Mean over rows i of -log(exp(s_i.t_i / T) / sum_j exp(s_i.t_j / T)), one row at a time."""
    terms = []
    for i in range(s.shape[0]):
        sims = torch.stack([(s[i] * t[j]).sum() / temperature for j in range(t.shape[0])])
        terms.append(-sims[i] + sims.exp().sum().log())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("project_teacher", [True, False])
def test_contrastive_global_is_info_nce_with_in_batch_negatives(gen, symmetric, project_teacher):
    dim = 5 if project_teacher else DT
    fn = _loss("contrastive.global", dim=dim, temperature=0.1, project_teacher=project_teacher,
               symmetric=symmetric).double()
    s, t = _student(gen), _teacher(gen)
    loss, _ = fn(s, t, {})
    zs = l2_normalise(linear(fn.student_proj, s.cls))
    zt = l2_normalise(linear(fn.teacher_proj, t.cls.detach()) if project_teacher else t.cls.detach())
    expected = _info_nce(zs, zt, 0.1)
    if symmetric:
        expected = (expected + _info_nce(zt, zs, 0.1)) / 2
    # the direction matters: student -> teacher alone differs from teacher -> student alone
    assert abs(float(_info_nce(zs, zt, 0.1).detach() - _info_nce(zt, zs, 0.1).detach())) > 1e-3
    close(loss.detach(), expected.detach(), torch.float64)
    params = [s.cls, *fn.parameters()]
    for g, w in zip(torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(expected, params)):
        close(g, w, torch.float64)
    loss.backward()
    assert fn.student_proj.weight.grad.abs().max() > 0
    if project_teacher:
        assert fn.teacher_proj.weight.grad.abs().max() > 0
    else:
        assert fn.teacher_proj is None
    assert t.cls.grad is None, "contrastive.global let gradients reach the teacher's features"


def test_contrastive_global_defaults_and_errors():
    fn = _loss("contrastive.global")
    assert fn.cfg.dim == 768 and fn.cfg.temperature == 0.07 and fn.cfg.project_teacher and not fn.cfg.symmetric
    assert fn.student_proj.out_features == 768 and fn.teacher_proj.in_features == DT
    with pytest.raises(RecipeError, match=rf"{DT} wide, but dim = 768: set dim = {DT}"):
        _loss("contrastive.global", project_teacher=False)
    with pytest.raises(RecipeError, match=r"contrastive.global .* has none: add a \[teacher\]"):
        _loss("contrastive.global", teacher_dim=None)


# ---- cosine.patch ----
def test_cosine_patch_is_one_minus_cosine_of_projected_patches(gen):
    fn = _loss("cosine.patch").double()
    assert fn.needs_patches
    s, t = _student(gen), _teacher(gen)
    loss, _ = fn(s, t, {})
    pred, target = linear(fn.proj, s.patches), t.patches.detach()
    cos = (pred * target).sum(-1) / ((pred**2).sum(-1).sqrt() * (target**2).sum(-1).sqrt())
    expected = (1 - cos).sum() / (B * N)
    close(loss.detach(), expected.detach(), torch.float64)
    params = [s.patches, *fn.parameters()]
    for g, w in zip(torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(expected, params)):
        close(g, w, torch.float64)
    loss.backward()
    assert fn.proj.weight.grad.abs().max() > 0 and fn.proj.bias.grad.abs().max() > 0
    assert t.patches.grad is None, "cosine.patch let gradients reach the teacher's patches"


def test_cosine_patch_errors(gen):
    fn = _loss("cosine.patch").double()
    other = TeacherOutput(cls=torch.zeros(B, DT), patches=torch.zeros(B, N + 1, DT), grid=(1, N + 1))
    with pytest.raises(ShapeError, match=r"train.resize_teacher_grid = true"):
        fn(_student(gen), other, {})
    with pytest.raises(RecipeError, match=r"cosine.patch .* has none: add a \[teacher\]"):
        _loss("cosine.patch", teacher_dim=None)
