"""Triton kernels behind kdforge.ops (one module per op) and their host-side launchers.

Nothing here is imported by ``import kdforge`` or ``import kdforge.ops``: the op wrappers import a kernel module
the first time a Triton backend runs, so kdforge works where triton is missing or broken. Triton decides at
``@triton.jit`` time whether a kernel runs compiled (CUDA) or in its CPU interpreter (TRITON_INTERPRET=1, tests
only), hence the variable must be set before the first kernel module is imported.

Launchers take tensors already checked by the wrappers in kdforge/ops (shapes, dtypes, devices) and return plain
tensors; autograd lives in the wrappers.
"""
