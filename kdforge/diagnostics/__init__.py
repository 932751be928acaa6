"""Diagnostics of a run or a model, each also a ``kdforge diagnose <name>`` command.

:mod:`kdforge.diagnostics.curves`: training curves (loss terms, lr, throughput, gradient norm, evaluations) from a
run directory's metrics.jsonl, as one PNG.
"""

from kdforge.diagnostics.curves import plot_curves, read_metrics

__all__ = ["plot_curves", "read_metrics"]
