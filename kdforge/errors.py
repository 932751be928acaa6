"""Errors a user can act on. The CLI turns each into one message and exit code 2."""

from __future__ import annotations


class KdforgeError(Exception):
    """Base for errors caused by the user's input (recipe, paths, data, shapes), not by a bug."""

    exit_code = 2


class RecipeError(KdforgeError):
    """A recipe key, table, type or value is wrong."""


class PluginError(KdforgeError):
    """A plugin failed to load, or two components share one name."""


class DataError(KdforgeError):
    """A data root is missing, or too many images are unreadable."""


class ShapeError(KdforgeError):
    """Teacher and student (or inputs of an op) do not fit together."""


class BackendUnavailable(KdforgeError):
    """An op backend was asked for that cannot run here (not built, no GPU, no Triton)."""


class TrainingDiverged(KdforgeError):
    """The loss became NaN or inf."""


class MetricsError(KdforgeError):
    """A run's metrics.jsonl is missing, or holds nothing to read yet."""


class CheckpointError(KdforgeError):
    """A checkpoint is missing, damaged, refused (it holds objects that could run code) or does not fit the run."""


class RunDirectoryError(KdforgeError):
    """The run directory cannot be used: a file is in the way, it is not writable, another run holds it, or it
    holds an earlier run's files."""


class ExportError(KdforgeError):
    """A student cannot be exported in a format asked for, or what was written does not reproduce the student."""
