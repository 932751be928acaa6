"""The ``retrieved`` data source: a transfer set that ``kdforge retrieve`` wrote, read back as images.

It reads the manifest (one retrieved gallery entry per line: its image's number and source, crop box and
augmentation operations) and the header beside it, rebuilds the gallery's data source, and remakes each entry's
pixels exactly as they were embedded (:func:`kdforge.retrieval.crops.remake`) before the recipe's augmentation.
Labels: -1 (an unlabelled transfer set, the usual case), or with ``labels = "query"`` the class of the query each
entry was retrieved for (a pseudo-label).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from kdforge.data import DataSource, Skipped
from kdforge.data.datasets import apply_transform
from kdforge.errors import DataError

__all__ = ["RetrievedSource"]


class RetrievedDataset(torch.utils.data.Dataset):
    def __init__(self, gallery: torch.utils.data.Dataset, records: list[dict], size: int, labels: bool,
                 transform: Callable[[Any], torch.Tensor] | None):
        import numpy as np

        self.gallery, self.size, self.transform = gallery, size, transform
        # plain arrays, not a list of dicts (DataLoader workers are forked: see FileImageDataset)
        self.items = np.array([r["item"] for r in records], dtype=np.int64)
        self.boxes = np.array([r["box"] for r in records], dtype=np.int64).reshape(-1, 4)
        self.ops = [json.dumps(r["ops"]) for r in records]
        self.sources = np.array([str(r["source"]).encode() for r in records] or [b""], dtype=bytes)
        self.labels = np.array([r["query_label"] if labels else -1 for r in records], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def params(self, i: int):
        from kdforge.retrieval.crops import CropParams

        return CropParams.from_json({"box": self.boxes[i].tolist(), "ops": json.loads(self.ops[i])})

    def __getitem__(self, i: int) -> dict | Skipped:
        from kdforge.retrieval.crops import remake
        from kdforge.retrieval.store import source_of

        item = int(self.items[i])
        source = self.sources[i].decode()
        raw = self.gallery[item]
        if isinstance(raw, Skipped):
            return raw
        now = source_of(self.gallery, item)
        if now != source:
            raise DataError(f"retrieved entry {i} came from '{source}' but gallery image {item} is now '{now}': the "
                            "gallery changed since the retrieval; run kdforge retrieve again")
        try:
            pixels = remake(raw["image"], self.params(i), self.size)
        except ValueError as exc:
            return Skipped(source, str(exc))
        return {"image": apply_transform(self.transform, pixels), "label": int(self.labels[i]), "index": i}


class RetrievedSource(DataSource):
    """A retrieval-augmented transfer set: the entries of a ``kdforge retrieve`` manifest, remade from the gallery."""

    name = "retrieved"
    splits = ("train",)

    @dataclasses.dataclass
    class Config:
        manifest: str = ""
        "the retrieval's output directory (or its manifest.jsonl); in a multi-stage recipe \"stage:NAME\""
        labels: Literal["none", "query"] = "none"
        "label of each entry: none (-1, unlabelled) or the class of the query it was retrieved for"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        from kdforge.retrieval.pipeline import HEADER, MANIFEST

        if not cfg.manifest:
            raise DataError("data.manifest is empty: give the directory kdforge retrieve wrote (or its manifest.jsonl)")
        path = Path(cfg.manifest)
        directory = path if path.is_dir() or path.suffix != ".jsonl" else path.parent
        self.manifest = directory / MANIFEST if path.suffix != ".jsonl" else path
        self.header_path = directory / HEADER
        if not self.manifest.is_file() or not self.header_path.is_file():
            raise DataError(f"no retrieval in '{directory}' ({MANIFEST} and {HEADER} are needed): run kdforge "
                            "retrieve RECIPE first (or the recipe's retrieve stage)")
        self.header = json.loads(self.header_path.read_text())
        if cfg.labels == "query":
            self.num_classes = self.header.get("num_classes")
            if not self.num_classes:
                raise DataError(f"labels = \"query\" but the queries of '{directory}' had no classes")
            self.classes = list(self.header.get("classes") or [])
        else:
            self.num_classes = None

    def build(self, split: str, transform: Callable[[Any], torch.Tensor] | None) -> RetrievedDataset:
        if split != "train":
            raise DataError(f"a retrieved transfer set has one split, 'train', not {split!r}")
        from kdforge.data.shards import random_access
        from kdforge.plugins import get_registry

        records = []
        with open(self.manifest) as f:
            for line_no, line in enumerate(f, 1):
                try:
                    records.append(json.loads(line))
                except ValueError as exc:
                    raise DataError(f"{self.manifest}:{line_no} is not a JSON line ({exc}): the manifest is damaged; "
                                    "run kdforge retrieve again") from None
        gallery = random_access(get_registry().create("data_sources", self.header["gallery"], "retrieved gallery"),
                                "train", None)  # numbered as kdforge retrieve numbered it
        return RetrievedDataset(gallery, records, int(self.header["image_size"]), self.cfg.labels == "query",
                                transform)
