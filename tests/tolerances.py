"""One comparison for the kernel tests (tests/ops, tests/ext): a result against its expected tensor, within a
tolerance relative to the expected tensor's own magnitude (imported by name: tests/ is on sys.path under pytest's
prepend mode, like cli_helpers).

Why relative to the magnitude: a mean-reduced gradient over [4 * 257, 768] elements is ~1e-6 per element. Any
absolute atol (1e-5 in fp32, 1.6e-2 in bf16), or one scaled by a magnitude floored at 1, lets an all-zero or a
doubled gradient of that size pass. Here atol is a fraction of max|expected| (elements near zero, e.g. after a
cancellation, carry the rounding error of the tensor's large elements), rtol applies element by element, and
neither may be loose enough to accept 0 or 2 x expected.
"""

from __future__ import annotations

import torch

# Per input dtype: (rtol, atol as a fraction of max|expected|), for results computed with fp32 accumulation (fp64
# for fp64 inputs) and rounded to the input dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

# The only absolute term, in units of the result dtype's smallest subnormal: a result stored in that dtype cannot
# be finer than this (fp16: 6e-8, so a mean gradient of ~1e-6 in fp16 keeps a few bits; bf16 and fp32: ~1e-40,
# nothing). Where the expected tensor is exactly zero (an empty selection, rows outside an index) it demands zero.
RESOLUTION_STEPS = 4

# rtol + atol fraction at or above this would accept wrong results at the largest element (0.5 accepts 1.5 x
# expected, 1 accepts 0 and 2 x expected): a factor that loose is refused rather than silently making a test blind.
MAX_TOTAL = 0.5


def magnitude(expected: torch.Tensor) -> float:
    """The largest finite |value| of ``expected`` (0 for an empty or all non-finite tensor)."""
    finite = expected.detach()[torch.isfinite(expected.detach())]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.tiny * info.eps  # 2**emin * 2**-(mantissa bits)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, factor: float = 1.0,
          msg: str | None = None) -> None:
    """actual ~ expected within the tolerance of inputs of ``dtype`` (times ``factor``), relative to the expected
    tensor: |actual - expected| <= rtol |expected| + atol_frac max|expected| (+ the resolution of actual's dtype)
    element by element."""
    rtol, atol_frac = (t * factor for t in TOL[dtype])
    if rtol + atol_frac >= MAX_TOTAL:
        raise ValueError(f"tolerance rtol {rtol:g} + atol fraction {atol_frac:g} (dtype {dtype}, factor {factor:g}) "
                         f"is >= {MAX_TOTAL}: it would pass a result off by half its size; use a smaller factor")
    floor = RESOLUTION_STEPS * _smallest_subnormal(actual.dtype) if actual.is_floating_point() else 0.0
    expected = expected.detach().cpu().double()
    atol = atol_frac * magnitude(expected) + floor
    torch.testing.assert_close(actual.detach().cpu().double(), expected, rtol=rtol, atol=atol, msg=msg)


def score_tol(expected_scores, rel: float) -> float:
    """An absolute tolerance on search scores (and for calling two scores tied): ``rel`` times the largest finite
    |expected score|."""
    return rel * magnitude(torch.as_tensor(expected_scores).double())
