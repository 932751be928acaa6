"""Every hook kdforge calls. Plugins implement them with ``@kdforge.hookimpl``.

Contribution hooks (``kdforge_register_<kind>``) are called once, when the plugin manager is first built
(:func:`kdforge.plugins.get_plugin_manager`). Each returns a list of component classes; every class has a
unique string ``name`` (e.g. ``"proteus.token"``) and a ``Config`` dataclass built from its recipe table
(all keys but ``plugin``). All results are collected (no first-result-wins); a name registered twice is an
error naming both origins.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("kdforge")

#: The component kinds, in the order ``kdforge plugins`` lists them. Each has a ``kdforge_register_<kind>`` hook.
KINDS = ("teachers", "students", "losses", "data_sources", "maskers", "evaluators", "loggers")


@hookspec
def kdforge_register_teachers() -> list[type]:
    """Called once at start-up. Return teacher classes (frozen models that produce distillation targets).

    A teacher class subclasses :class:`kdforge.teachers.Teacher`: ``forward(images) -> TeacherOutput``.
    """


@hookspec
def kdforge_register_students() -> list[type]:
    """Called once at start-up. Return student classes (trainable models).

    A student class subclasses :class:`kdforge.students.Student`: ``forward(images, mask=None) -> StudentOutput``.
    """


@hookspec
def kdforge_register_losses() -> list[type]:
    """Called once at start-up. Return loss classes (distillation and supervised objectives).

    A loss class subclasses :class:`kdforge.losses.DistillLoss`:
    ``forward(student_out, teacher_out, batch) -> (loss, metrics)``; it declares the student view it reads, whether
    it reads the teacher and whether it reads labels (``view``, ``reads_teacher``, ``needs_labels``), and whether it
    ignores unlabelled items (``ignores_unlabelled``); ``view`` and ``ignores_unlabelled`` may be set per instance
    (supervised.ce's ``view = "unmixed"`` reads the image before Mixup / CutMix).
    """


@hookspec
def kdforge_register_data_sources() -> list[type]:
    """Called once at start-up. Return data-source classes.

    A data source subclasses :class:`kdforge.data.DataSource`: ``build(split, transform) -> Dataset``.
    """


@hookspec
def kdforge_register_maskers() -> list[type]:
    """Called once at start-up. Return masker classes (patch masks for masked student views).

    A masker subclasses :class:`kdforge.masking.Masker`: ``__call__(batch_size, grid, generator) -> BoolTensor[B, N]``.
    """


@hookspec
def kdforge_register_evaluators() -> list[type]:
    """Called once at start-up. Return evaluator classes (kNN, linear probe, ...).

    An evaluator subclasses :class:`kdforge.eval.Evaluator`:
    ``run(encoder, train_set, test_set, device) -> dict[str, float]``; ``reads = "logits"`` gets a trained
    classifier's logits instead of features (the "classifier" evaluator).
    """


@hookspec
def kdforge_register_loggers() -> list[type]:
    """Called once at start-up. Return metric-logger classes (JSONL, TensorBoard, ...).

    A logger subclasses :class:`kdforge.engine.logging.MetricLogger`: ``log(step, metrics)`` and ``close()``.
    """
