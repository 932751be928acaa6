"""Each built-in loss against an independent float64 computation of its published formula.

Proteus (papers/000 sec. 3.2 and its released code): MSE through LayerNorm + Linear heads; token = CLS, feature =
[CLS; patches] of the clean view with the CLS row through the token head, patch = masked positions only of the
masked view. FD (papers/004 eq. 1 and its released code): smooth-L1 (beta) between a linear projection of the
student's map [CLS; patches] and the teacher's map whitened by a LayerNorm without affine (eps inside the square
root). The engine's total is sum(weight x loss). The formulas here are written out by hand (no F.layer_norm,
F.mse_loss or F.smooth_l1_loss), so a loss that drops the whitening, ignores eps or beta, reads other tokens, or lets
gradients reach the teacher fails them.
"""

from __future__ import annotations

import pytest
import torch

from kdforge.plugins import create
from kdforge.students import StudentOutput
from kdforge.teachers import TeacherOutput
from tolerances import close

B, N, DS, DT = 3, 5, 6, 7
BACKENDS = ["reference", "auto"]


def _outputs(gen) -> tuple[StudentOutput, TeacherOutput]:
    """float64 outputs; teacher rows with large, unequal means and scales (so whitening changes every value) and
    requiring grad (so a loss that does not detach the teacher shows it)."""
    s = StudentOutput(cls=torch.randn(B, DS, generator=gen, dtype=torch.float64),
                      patches=torch.randn(B, N, DS, generator=gen, dtype=torch.float64), grid=(1, N))
    shift = 3 * torch.randn(B, N + 1, 1, generator=gen, dtype=torch.float64)
    scale = 0.5 + 2 * torch.rand(B, N + 1, 1, generator=gen, dtype=torch.float64)
    t = shift + scale * torch.randn(B, N + 1, DT, generator=gen, dtype=torch.float64)
    return s, TeacherOutput(cls=t[:, 0].clone().requires_grad_(), patches=t[:, 1:].clone().requires_grad_(),
                            grid=(1, N))


def _loss(plugin, **cfg):
    fn = create("losses", {"plugin": plugin, **cfg}, "loss", student_dim=DS, teacher_dim=DT).double()
    for p in fn.parameters():  # non-trivial head parameters: LayerNorm affine and bias away from 1 and 0
        with torch.no_grad():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return fn


# ---- the formulas, by hand in float64 ----
def layer_norm(x, weight=None, bias=None, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def proteus_head(head, x):  # LayerNorm (affine) + Linear
    y = layer_norm(x, head.norm.weight, head.norm.bias, head.norm.eps)
    return y @ head.linear.weight.T + head.linear.bias


def mse(a, b):
    return ((a - b) ** 2).sum() / a.numel()


def smooth_l1(a, b, beta):
    d = (a - b).abs()
    return torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).sum() / a.numel()


def assert_close(actual, expected, backend="reference"):
    # "reference" computes in float64 for float64 inputs; "auto" may pick a compiled kernel that accumulates in fp32
    close(actual, expected, torch.float64 if backend == "reference" else torch.float32)


def _check(loss, expected, teacher_out, params, backend):
    """Value and student-side gradients against the formula; nothing reaches the teacher."""
    assert_close(loss.double(), expected, backend)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(expected, params, retain_graph=True, allow_unused=True)
    for p, g, w in zip(params, grads, want):
        zero = torch.zeros_like(p)
        assert_close((g if g is not None else zero).double(), w if w is not None else zero, backend)
    loss.backward()
    assert teacher_out.cls.grad is None and teacher_out.patches.grad is None, \
        "the loss let gradients reach the teacher's output: targets must be detached"


@pytest.mark.parametrize("backend", BACKENDS)
def test_proteus_token_loss_is_mse_of_the_projected_cls(gen, backend):
    s, t = _outputs(gen)
    s.cls.requires_grad_()
    fn = _loss("proteus.token", backend=backend)
    loss, _ = fn(s, t, {"mask": torch.zeros(B, N, dtype=torch.bool)})
    expected = mse(proteus_head(fn.head, s.cls), t.cls.detach())
    _check(loss, expected, t, [s.cls, *fn.parameters()], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["token_head", "own_head", "exclude"])
def test_proteus_feature_loss_is_mse_over_cls_and_patches(gen, backend, cls):
    s, t = _outputs(gen)
    s.cls.requires_grad_(), s.patches.requires_grad_()
    token = _loss("proteus.token", backend=backend)
    fn = _loss("proteus.feature", backend=backend, cls=cls)
    fn.bind({"token": token, "feature": fn}, "losses.feature")
    loss, _ = fn(s, t, {"mask": torch.zeros(B, N, dtype=torch.bool)})
    pred, target = proteus_head(fn.head, s.patches), t.patches.detach()
    if cls != "exclude":
        row0 = proteus_head(token.head if cls == "token_head" else fn.head, s.cls)
        pred = torch.cat([row0[:, None], pred], 1)
        target = torch.cat([t.cls.detach()[:, None], target], 1)
    expected = mse(pred, target)
    _check(loss, expected, t, [s.cls, s.patches, *fn.parameters(), *token.parameters()], backend)


def test_proteus_feature_loss_whitening_option_uses_eps_free_layer_norm(gen):
    s, t = _outputs(gen)
    fn = _loss("proteus.feature", cls="own_head", whiten=True, backend="reference")
    loss, _ = fn(s, t, {})
    target = layer_norm(torch.cat([t.cls[:, None], t.patches], 1).detach())
    pred = torch.cat([proteus_head(fn.head, s.cls)[:, None], proteus_head(fn.head, s.patches)], 1)
    assert_close(loss.double(), mse(pred, target))


@pytest.mark.parametrize("backend", BACKENDS)
def test_proteus_patch_loss_reads_masked_positions_only(gen, backend):
    s, t = _outputs(gen)
    s.patches.requires_grad_()
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, [1, 3]] = True  # image 0: two patches; image 1: none; image 2: all
    mask[2] = True
    fn = _loss("proteus.patch", backend=backend)
    loss, metrics = fn(s, t, {"mask": mask})
    expected = mse(proteus_head(fn.head, s.patches[mask]), t.patches.detach()[mask])
    _check(loss, expected, t, [s.patches, *fn.parameters()], backend)
    assert metrics["masked_patches"] == int(mask.sum())
    # the unmasked positions do not matter at all
    other = StudentOutput(cls=s.cls, patches=torch.where(mask[..., None], s.patches.detach(), 100.0), grid=s.grid)
    assert_close(fn(other, t, {"mask": mask})[0], loss.detach(), backend)
    # nothing masked: zero, and the head still in the graph
    none, _ = fn(s, t, {"mask": torch.zeros(B, N, dtype=torch.bool)})
    assert float(none) == 0.0 and none.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta, eps, include_cls", [(2.0, 1e-5, True), (0.5, 0.7, True), (2.0, 1e-5, False)])
def test_fd_feature_loss_is_smooth_l1_to_the_whitened_teacher_map(gen, backend, beta, eps, include_cls):
    s, t = _outputs(gen)
    s.cls.requires_grad_(), s.patches.requires_grad_()
    fn = _loss("fd.feature", backend=backend, beta=beta, eps=eps, include_cls=include_cls)
    loss, _ = fn(s, t, {"mask": torch.zeros(B, N, dtype=torch.bool)})
    tokens, target = s.patches, t.patches.detach()
    if include_cls:
        tokens = torch.cat([s.cls[:, None], tokens], 1)
        target = torch.cat([t.cls.detach()[:, None], target], 1)
    pred = tokens @ fn.head.weight.T + fn.head.bias
    expected = smooth_l1(pred, layer_norm(target, eps=eps), beta)
    # the case is sensitive to what it checks: whitening, eps and beta each change the value by far more than the
    # tolerance
    assert abs(float(smooth_l1(pred, target, beta) / expected) - 1) > 0.1
    assert abs(float(smooth_l1(pred, layer_norm(target, eps=0.0), beta) / expected) - 1) > (1e-7 if eps < 1e-3 else 1e-2)
    assert abs(float(smooth_l1(pred, layer_norm(target, eps=eps), 1.0) / expected) - 1) > 1e-2
    _check(loss, expected, t, [s.cls, s.patches, *fn.parameters()], backend)


def test_the_engine_total_is_the_weighted_sum_of_the_losses(gen):
    from kdforge.engine.trainer import DistillModule

    s, t = _outputs(gen)

    # the masked view: masked patches + SHIFT (not a constant: the heads' LayerNorm would remove a constant)
    shift = torch.linspace(-1, 2, DS, dtype=torch.float64)

    class Fixed(torch.nn.Module):
        def forward(self, images, mask=None):
            if mask is None or not mask.any():
                return StudentOutput(cls=s.cls.repeat(images.shape[0] // B, 1),
                                     patches=s.patches.repeat(images.shape[0] // B, 1, 1), grid=s.grid)
            shifted = mask[..., None].double() * shift + s.patches.repeat(images.shape[0] // B, 1, 1)
            return StudentOutput(cls=s.cls.repeat(images.shape[0] // B, 1), patches=shifted, grid=s.grid)

    losses = {"token": _loss("proteus.token", backend="reference"),
              "feature": _loss("proteus.feature", backend="reference"),
              "patch": _loss("proteus.patch", backend="reference")}
    for label, fn in losses.items():
        fn.bind(losses, f"losses.{label}")
    weights = {"token": 0.7, "feature": 1.3, "patch": 2.0}
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, :2] = True
    model = DistillModule(Fixed(), losses, weights)
    total, terms = model(torch.zeros(B, 3, 4, 4), mask, t, {})
    tok = mse(proteus_head(losses["token"].head, s.cls), t.cls.detach())
    feat = mse(torch.cat([proteus_head(losses["token"].head, s.cls)[:, None],
                          proteus_head(losses["feature"].head, s.patches)], 1),
               torch.cat([t.cls.detach()[:, None], t.patches.detach()], 1))
    patch = mse(proteus_head(losses["patch"].head, (s.patches + shift)[mask]), t.patches.detach()[mask])
    assert_close(terms["token"].double(), tok)
    assert_close(terms["feature"].double(), feat)  # the clean view: no shift on the masked patches
    assert_close(terms["patch"].double(), patch)  # the masked view
    close(total, 0.7 * tok + 1.3 * feat + 2.0 * patch, torch.float32)  # the engine sums in float32
