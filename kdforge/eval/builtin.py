"""The built-in evaluators, registered through the same hook as third-party ones."""

from __future__ import annotations

from kdforge.eval.classifier import ClassifierEvaluator
from kdforge.eval.knn import KnnEvaluator
from kdforge.eval.linear import LinearProbeEvaluator
from kdforge.eval.linear_dinov2 import DinoV2LinearEvaluator
from kdforge.plugins import hookimpl


@hookimpl
def kdforge_register_evaluators() -> list[type]:
    return [ClassifierEvaluator, KnnEvaluator, LinearProbeEvaluator, DinoV2LinearEvaluator]
