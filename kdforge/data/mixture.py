"""A transfer set mixed from several sources, each drawn with a set frequency (the ``mixture`` data source).

papers/002 distils on original and synthetic (diffusion-mixed) images "sampled with equal frequency", whatever the
sizes of the two sets; a retrieval-augmented transfer set (papers/001) mixes the task's images with retrieved ones
the same way. The epoch's positions are split among the sources in proportion to their frequencies
(largest-remainder rounding, so each source gets exactly its share) and interleaved evenly; the item at a position
is drawn uniformly from its source's train split with torch's generator inside ``__getitem__``, which the engine
seeds per item (:class:`kdforge.engine.trainer.SeededItems`), so an epoch is reproducible and a resume exact.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Callable, Sequence

import torch

from kdforge.data import DataSource, Skipped
from kdforge.data.subsets import check_source_table
from kdforge.errors import DataError, RecipeError
from kdforge.ranges import ItemCount, PositiveFloat

__all__ = ["MIXTURE_TABLE_KEYS", "MixtureDataset", "MixtureSource", "apportion", "interleave"]

#: Keys of a [data.sources.<name>] table that the mixture reads (the others are the source plugin's Config).
MIXTURE_TABLE_KEYS = {"frequency": PositiveFloat, "labels": bool}
"""frequency: the source's share of each epoch, relative to the others' (default 1.0); labels: keep the source's
labels (default true), or give its items label -1 (false)."""


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (each > 0) by largest remainders: each share is
    its exact quota rounded down, and the units left go to the largest fractional parts (the earlier on ties).
    The shares sum to ``total``; computed with exact fractions, so equal weights always split alike."""
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    whole = sum(Fraction(w) for w in weights)
    quotas = [total * Fraction(w) / whole for w in weights]
    shares = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def interleave(counts: Sequence[int]) -> torch.Tensor:
    """Tensor[sum(counts)] of source numbers, source s appearing ``counts[s]`` times, spread evenly: its k-th
    position is where (k + 1/2) / counts[s] falls among every source's such fractions (the earlier source first on
    ties). A prefix of the sequence holds each source in about its proportion."""
    dtype = torch.int16 if len(counts) < 2**15 else torch.int32
    keys = torch.cat([(torch.arange(n, dtype=torch.float64) + 0.5) / n for n in counts if n] or [torch.zeros(0)])
    owners = torch.cat([torch.full((n,), s, dtype=dtype) for s, n in enumerate(counts) if n] or
                       [torch.zeros(0, dtype=dtype)])
    return owners[torch.argsort(keys, stable=True)]


class MixtureDataset(torch.utils.data.Dataset):
    """One epoch of a mixture: position i belongs to source ``owners[i]`` and holds an item drawn uniformly from
    that source's dataset with torch's global generator. Items keep their source's label where ``keep_labels`` says
    so (else -1) and get ``"index": i``; unreadable items stay :class:`Skipped` records."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], keep_labels: Sequence[bool], owners: torch.Tensor,
                 names: Sequence[str] = ()):
        self.datasets, self.keep_labels, self.owners = list(datasets), list(keep_labels), owners
        self.names = list(names) or [str(s) for s in range(len(self.datasets))]

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def counts(self) -> list[int]:
        """Positions per source in an epoch."""
        return torch.bincount(self.owners.long(), minlength=len(self.datasets)).tolist()

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, item of that source's dataset) for position ``index``; the item is drawn with torch's
        global generator (one ``torch.randint``), so it is fixed by the generator's state."""
        source = int(self.owners[index])
        return source, int(torch.randint(len(self.datasets[source]), ()))

    def __getitem__(self, index: int) -> dict | Skipped:
        source, inner = self.locate(index)
        item = self.datasets[source][inner]
        if isinstance(item, Skipped):
            return item
        return {**item, "label": int(item["label"]) if self.keep_labels[source] else -1, "index": int(index)}


class MixtureSource(DataSource):
    """A train split mixed from several named sources, each taking a fixed share of every epoch (its ``frequency``)
    whatever its size, with or without its labels."""

    name = "mixture"
    splits = ("train",)

    @dataclasses.dataclass
    class Config:
        sources: dict[str, dict[str, Any]] = dataclasses.field(
            default_factory=lambda: {"original": {"plugin": "procedural"}})
        """Named data-source tables; besides `plugin` and its keys, each may set `frequency` and `labels`."""
        length: ItemCount = 0
        """Items per epoch (0: the sum of the sources' train-split sizes)."""

        def __post_init__(self) -> None:
            if not self.sources:
                raise ValueError("sources must name at least one source, e.g. sources.original = {plugin = "
                                 "\"digits\"}")
            for name, table in self.sources.items():
                check_source_table(table, f"data.sources.{name}", MIXTURE_TABLE_KEYS)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        from kdforge.plugins import create
        from kdforge.recipe import plugin_table

        self.names = list(cfg.sources)
        self.frequencies = [float(t.get("frequency", 1.0)) for t in cfg.sources.values()]
        self.keep_labels = [bool(t.get("labels", True)) for t in cfg.sources.values()]
        self.sources = [create("data_sources", plugin_table(t, MIXTURE_TABLE_KEYS), f"data.sources.{name}")
                        for name, t in cfg.sources.items()]
        self.num_classes = self._num_classes()

    def _num_classes(self) -> int | None:
        """The classes of the sources that keep labels (they must agree); None when none keeps any."""
        labelled = [(name, src.num_classes) for name, src, keep in zip(self.names, self.sources, self.keep_labels)
                    if keep and src.num_classes]
        for name, count in labelled[1:]:
            first, first_count = labelled[0]
            if count != first_count:
                raise RecipeError(
                    f"data.sources.{first} has {first_count} classes but data.sources.{name} has {count}: the "
                    "sources of a mixture that keep their labels must share one set of classes; set labels = false "
                    f"on the one whose labels should be dropped (e.g. data.sources.{name}.labels = false)")
        return labelled[0][1] if labelled else None

    def build(self, split: str, transform: Callable[[Any], torch.Tensor] | None) -> MixtureDataset:
        if split != "train":
            raise DataError(f"the mixture source is a transfer set: it has a train split only, no '{split}' split; "
                            "evaluate on a labelled source of its own under [eval.data], e.g. "
                            "[eval.data] plugin = \"digits\"")
        datasets = []
        for name, source in zip(self.names, self.sources):
            dataset = source.build("train", transform)
            if isinstance(dataset, torch.utils.data.IterableDataset):
                raise DataError(f"data.sources.{name} ({source.name}) streams its images, but a mixture draws items "
                                "of each source at random: use a source that can be indexed (image_folder, "
                                "procedural, digits, single_image)")
            datasets.append(dataset)
        length = self.cfg.length or sum(len(d) for d in datasets)
        counts = apportion(length, self.frequencies)
        for name, dataset, count in zip(self.names, datasets, counts):
            if count and not len(dataset):
                raise DataError(f"data.sources.{name} has no images in its train split, but its frequency gives it "
                                f"{count} of the {length} items of each epoch: point it at images, or remove it")
        return MixtureDataset(datasets, self.keep_labels, interleave(counts), self.names)
