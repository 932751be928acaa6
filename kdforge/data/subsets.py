"""Sources built from another source: ``few_shot`` keeps N images of each class of its train split.

A few-shot train split is what task-specific distillation starts from when labels are scarce (papers/001 and 002
fine-tune and probe on small labelled sets). The choice is stratified and stable: each image of the inner train
split gets a key hashed from the seed and its position, and each class keeps its N images of lowest key. The same
seed therefore gives the same images whatever the transform or the other keys are, a larger N keeps every image of
a smaller one, and one class's choice does not depend on the others.

:func:`check_source_table` validates a nested data-source table (``data.source`` here, ``data.sources.<name>`` in
:mod:`kdforge.data.mixture`) against its plugin's Config when the recipe is resolved, as
:func:`kdforge.recipe.resolve` does for the top-level tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from kdforge.data import DataSource, Skipped
from kdforge.data.datasets import mix_seed
from kdforge.errors import DataError, RecipeError
from kdforge.ranges import PositiveInt, Seed

__all__ = ["FewShotSource", "SubsetDataset", "check_source_table", "dataset_labels", "few_shot_indices"]


def check_source_table(table: Any, where: str, engine_keys: Mapping[str, Any] | None = None) -> None:
    """Check a nested data-source table (``plugin`` and the plugin's Config keys, plus ``engine_keys``: keys the
    enclosing source reads, with their types) as recipe resolution checks a top-level one: :class:`RecipeError`
    naming ``where``, the key and the closest valid key."""
    from kdforge.plugins import get_registry
    from kdforge.recipe.schema import build

    registry = get_registry()
    if not isinstance(table, dict):
        raise RecipeError(f"{where} must be a data-source table like {where} = {{plugin = \"digits\"}}, got {table!r}")
    body = dict(table)
    name = body.pop("plugin", None)
    if not isinstance(name, str):
        what = "needs" if name is None else f"has plugin = {name!r}; it needs"
        known = ", ".join(registry.names("data_sources"))
        raise RecipeError(f"[{where}] {what} `plugin = \"...\"` naming one of {known}")
    build(registry.get("data_sources", name, where).Config, body, where, extra=engine_keys)


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """torch's, Python's and numpy's global generators seeded with 0 inside, and put back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def dataset_labels(dataset: torch.utils.data.Dataset) -> torch.Tensor:
    """LongTensor[N]: the label of every item of a map-style dataset, -1 where unlabelled.

    Read from the dataset's ``labels`` (:class:`~kdforge.data.datasets.TensorImageDataset`,
    :class:`~kdforge.data.datasets.FileImageDataset`, :class:`SubsetDataset`: no image is decoded; None means
    unlabelled), else by loading every item (with the random generators seeded and put back afterwards); an item
    that cannot be read (:class:`Skipped`) has label -2 there, so that it is never chosen.
    """
    if hasattr(dataset, "labels"):
        labels = dataset.labels
        if labels is None:
            return torch.full((len(dataset),), -1, dtype=torch.long)
        return torch.as_tensor(labels, dtype=torch.long)
    with _rng_kept():
        items = [dataset[i] for i in range(len(dataset))]
    return torch.tensor([-2 if isinstance(it, Skipped) else int(it["label"]) for it in items], dtype=torch.long)


def _item_keys(seed: int, count: int) -> np.ndarray:
    """uint64[count]: a pseudo-random key per position 0..count-1, a pure function of (seed, position)
    (splitmix64's finaliser of the position offset by the mixed seed)."""
    with np.errstate(over="ignore"):
        z = np.arange(count, dtype=np.uint64) + np.uint64(mix_seed(seed, 0xF3))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def few_shot_indices(labels: torch.Tensor, classes: list[int], per_class: int, seed: int) -> dict[int, torch.Tensor]:
    """For each of ``classes``: the positions (LongTensor, ascending, at most ``per_class``) of its ``per_class``
    items of lowest key (:func:`_item_keys`) among ``labels`` (LongTensor[N]). A class with fewer items gets all."""
    keys = _item_keys(seed, len(labels))
    labels_np = labels.numpy()
    chosen = {}
    for c in classes:
        members = np.flatnonzero(labels_np == c)
        order = np.lexsort((members, keys[members]))  # by key; the position breaks (astronomically rare) ties
        chosen[c] = torch.from_numpy(np.sort(members[order[:per_class]])).long()
    return chosen


class SubsetDataset(torch.utils.data.Dataset):
    """Items ``indices`` (LongTensor[M]) of ``dataset``, renumbered: item i is ``dataset[indices[i]]`` with its
    label and ``"index": i``; an unreadable item stays a :class:`Skipped` record. ``labels``: LongTensor[len(dataset)]
    of the whole dataset (what :attr:`labels` reads), or None when unknown."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: torch.Tensor, labels: torch.Tensor | None = None):
        self.dataset = dataset
        self.indices = indices.long()
        self._all_labels = labels

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> torch.Tensor:
        """LongTensor[M]: the items' labels, read without loading them when the dataset's labels are known."""
        if self._all_labels is None:
            self._all_labels = dataset_labels(self.dataset)
        return self._all_labels[self.indices]

    def __getitem__(self, index: int) -> dict | Skipped:
        item = self.dataset[int(self.indices[index])]
        if isinstance(item, Skipped):
            return item
        return {**item, "index": int(index)}


def _class_names(source: DataSource, dataset: Any) -> list[str]:
    """Class names by index, where the dataset (image folders) or the source (procedural shapes) knows them."""
    names = getattr(dataset, "classes", None) or getattr(source, "classes", None) or ()
    return [str(n) for n in names]


class FewShotSource(DataSource):
    """N labelled images of each class of another source's train split (stratified, seeded, stable); the other
    splits are the inner source's as they are."""

    name = "few_shot"

    @dataclasses.dataclass
    class Config:
        source: dict[str, Any] = dataclasses.field(default_factory=lambda: {"plugin": "procedural"})
        """Recipe table of the labelled data source to pick from, e.g. {plugin = "image_folder", root = "..."}."""
        per_class: PositiveInt = 10
        """Images kept of each class of the train split (N-shot); every class needs at least that many."""
        seed: Seed = 0
        """Seed of the choice: the same seed gives the same images, and a larger per_class keeps a smaller one's."""

        def __post_init__(self) -> None:
            check_source_table(self.source, "data.source")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        from kdforge.plugins import create

        self.inner = create("data_sources", cfg.source, "data.source")

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        """The inner source's classes."""
        return self.inner.num_classes

    @property
    def classes(self):
        """The inner source's class names, where it knows them (else None)."""
        return getattr(self.inner, "classes", None)

    @property
    def splits(self) -> tuple[str, ...]:  # type: ignore[override]
        """The inner source's splits."""
        return self.inner.splits

    def build(self, split: str, transform: Callable[[Any], torch.Tensor] | None) -> torch.utils.data.Dataset:
        dataset = self.inner.build(split, transform)
        if split != "train":
            return dataset
        what = f"data.source ({self.cfg.source['plugin']})"
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise DataError(f"few_shot picks images by position, but {what} streams its train split: use a source "
                            "that can be indexed (image_folder, procedural, digits)")
        labels = dataset_labels(dataset)
        num_classes = self.inner.num_classes
        if not num_classes or not bool((labels >= 0).any()):
            raise DataError(f"few_shot keeps data.per_class images of each class, but the train split of {what} is "
                            "unlabelled: use a labelled source (image_folder with class folders, procedural, digits)")
        classes = sorted(set(range(num_classes)) | set(labels[labels >= 0].unique().tolist()))
        n = self.cfg.per_class
        chosen = few_shot_indices(labels, classes, n, self.cfg.seed)
        short = [(c, len(chosen[c])) for c in classes if len(chosen[c]) < n]
        if short:
            raise self._too_few(short, _class_names(self.inner, dataset), what)
        return SubsetDataset(dataset, torch.cat([chosen[c] for c in classes]).sort().values, labels)

    def _too_few(self, short: list[tuple[int, int]], names: list[str], what: str) -> DataError:
        def describe(c: int, count: int) -> str:
            name = f" ('{names[c]}')" if c < len(names) else ""
            return f"class {c}{name} has {count}"

        n = self.cfg.per_class
        listed = ", ".join(describe(c, count) for c, count in short[:5])
        more = f" and {len(short) - 5} more classes have fewer" if len(short) > 5 else ""
        least = min(count for _, count in short)
        fix = f"lower data.per_class to {least}, or" if least else "every class needs an image:"
        return DataError(f"few_shot keeps data.per_class = {n} images of each class, but in the train split of "
                         f"{what} {listed}{more}: {fix} give the source more images of "
                         f"{'that class' if len(short) == 1 else 'those classes'}")
