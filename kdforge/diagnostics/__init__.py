"""Diagnostics of a run or a model, each also a ``kdforge diagnose <name>`` command but the confusion plot.

:mod:`kdforge.diagnostics.curves`: training curves (loss terms, lr, throughput, gradient norm, evaluations) from a
run directory's metrics.jsonl, as one PNG. :mod:`kdforge.diagnostics.attention`: attention distance, head similarity
and mean attention maps of a ViT student. :mod:`kdforge.diagnostics.landscape`: the training objective around a
run's final weights along two filter-normalised random directions (papers/004).
:mod:`kdforge.diagnostics.confusion`: a classifier's confusion matrix (the classifier evaluator's result) as an image.
"""

from kdforge.diagnostics.confusion import plot_confusion
from kdforge.diagnostics.curves import plot_curves, read_metrics

__all__ = ["plot_confusion", "plot_curves", "read_metrics"]
