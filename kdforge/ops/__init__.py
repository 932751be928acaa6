"""Public kdforge ops: one contract for every hot path.

Each op has a pure-PyTorch reference (:mod:`kdforge.ops.reference`, the ground truth and CPU fallback), a Triton
kernel (:mod:`kdforge.kernels`, imported on first use), the compiled kdforge._C (through kdforge._ext) and a
``backend="auto" | "reference" | "triton" | "ext"`` argument (attention also "sdpa" and "xformers"). ``auto``:
Triton on CUDA; on the CPU the compiled extension where built, else the reference (SDPA for attention); never the
Triton interpreter. An explicit backend that cannot run raises :class:`kdforge.errors.BackendUnavailable` saying
why. :func:`available_backends` reports what can run here.

The Triton paths are ``torch.library`` custom ops in the ``kdforge_triton`` namespace with fake implementations
and registered autograd, so torch.compile traces through them.
"""

from kdforge.ops._dispatch import available_backends
from kdforge.ops.attn import attention
from kdforge.ops.masked_rows import masked_gather, masked_scatter
from kdforge.ops.neighbors import knn
from kdforge.ops.whitened import whitened_loss

__all__ = ["whitened_loss", "masked_gather", "masked_scatter", "attention", "knn", "available_backends"]
