"""Float64 references for the kdforge._C tests, written here on purpose: plain PyTorch, no kdforge code, so the
extension is checked against an independent formulation (the public kdforge.ops.reference is checked elsewhere).
"""

from __future__ import annotations

import torch
from torch import Tensor


def whitened_loss(student, teacher, *, loss="smooth_l1", beta=2.0, whiten=True, eps=1e-5, index=None,
                  reduction="mean") -> tuple[Tensor, Tensor]:
    """(loss, dloss/dstudent) in float64. Gradient in closed form, with torch's branch order for smooth-L1
    (d <= -beta -> -1, d >= beta -> +1, else d / beta), so beta = 0 is covered too."""
    dim = student.shape[-1]
    s_all = student.detach().reshape(-1, dim).double()
    t = teacher.detach().reshape(-1, dim).double()
    rows = torch.arange(s_all.shape[0]) if index is None else index.cpu()
    s, t = s_all[rows], t[rows]
    if whiten:
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        t = (t - mu) / torch.sqrt(var + eps)
    d = s - t
    if loss == "smooth_l1":
        ad = d.abs()
        el = torch.where(ad < beta, 0.5 * d * d / beta if beta > 0 else torch.zeros_like(d), ad - 0.5 * beta)
        dl = torch.where(d <= -beta, -torch.ones_like(d), torch.where(d >= beta, torch.ones_like(d),
                                                                      d / beta if beta > 0 else torch.zeros_like(d)))
    else:
        el, dl = d * d, 2 * d
    n_el = el.numel()
    if reduction == "none":
        out = el.sum(-1)
        out = out if index is not None else out.reshape(student.shape[:-1])
        scale = torch.ones(el.shape[0], 1, dtype=torch.float64)
    elif reduction == "sum":
        out, scale = el.sum(), torch.ones(())
    else:
        out = el.sum() / max(n_el, 1)
        scale = torch.full((), 1.0 / max(n_el, 1), dtype=torch.float64)
    grad = torch.zeros_like(s_all)
    grad.index_add_(0, rows, dl * scale)
    return out, grad.reshape(student.shape)


def knn(queries: Tensor, gallery: Tensor, k: int, metric: str = "ip") -> tuple[Tensor, Tensor]:
    """Brute force in float64 over the full [Q, G] score matrix (small inputs only): best first, equal scores in
    ascending gallery index (a stable sort of the columns, which start in index order)."""
    q, g = queries.detach().cpu().double(), gallery.detach().cpu().double()
    if metric == "ip":
        scores = q @ g.T
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    else:
        scores = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
        order = torch.sort(scores, dim=1, descending=False, stable=True).indices[:, :k]
    return scores.gather(1, order), order
