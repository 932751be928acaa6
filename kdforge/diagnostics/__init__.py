"""Diagnostics of a run or a model, each also a ``kdforge diagnose <name>`` command.

:mod:`kdforge.diagnostics.curves`: training curves (loss terms, lr, throughput, gradient norm, evaluations) from a
run directory's metrics.jsonl, as one PNG. :mod:`kdforge.diagnostics.attention`: attention distance, head similarity
and mean attention maps of a ViT student. :mod:`kdforge.diagnostics.landscape`: the training objective around a
run's final weights along two filter-normalised random directions (papers/004).
"""

from kdforge.diagnostics.curves import plot_curves, read_metrics

__all__ = ["plot_curves", "read_metrics"]
