"""Count unreadable images during a run and stop it when too many are bad.

A data source returns :class:`kdforge.data.Skipped` for an image it cannot decode, :func:`kdforge.data.collate`
drops it and lists it under ``batch["skipped"]``, and the training loop feeds every batch to a
:class:`SkipCounter`::

    skips = SkipCounter(max_bad_fraction=0.01)
    for batch in loader:
        skips.update(batch["skipped"], seen=len(batch["skipped"]) + len(batch["label"]))  # may raise DataError
        ...
    skips.check()              # end of the run: raises DataError if the fraction is too high
    summary["skipped_files"] = skips.report()       # [(path, reason), ...], JSON-friendly

A few bad files in a million are normal (truncated downloads, CMYK oddities); a high fraction means a wrong path,
a half-copied data set or a broken decoder, and training on what is left would quietly change the experiment.
During the run :meth:`SkipCounter.update` stops it as soon as ``min_items`` items were seen and the fraction is
too high; before that a few unlucky early batches must not end a run. :meth:`SkipCounter.check` at the end judges
whatever was seen.
"""

from __future__ import annotations

from typing import Iterable

from kdforge.data import Skipped
from kdforge.errors import DataError

__all__ = ["SkipCounter"]

_LISTED = 20  # bad files named in an error message; report() has them all


class SkipCounter:
    """Running count of items seen and skipped; raises :class:`DataError` when the skipped fraction is too high.

    Args:
        max_bad_fraction: largest tolerated fraction of unreadable items (0.01 = 1 %).
        min_items: :meth:`update` only judges the fraction once this many items were seen.
        setting: the recipe key that holds ``max_bad_fraction``, named in the error message.
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_items: int = 1000, setting: str = "train.max_bad_fraction"):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if min_items < 0:
            raise ValueError(f"min_items must be >= 0, got {min_items}")
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_items = int(min_items)
        self.setting = setting
        self.seen = 0
        self.count = 0
        # path -> reason, first occurrence; a file that fails every epoch is listed once but counted each time
        self._files: dict[str, str] = {}

    def update(self, skipped: Iterable[Skipped], seen: int) -> None:
        """Record one batch: ``skipped`` are its dropped items, ``seen`` counts all items read, good and bad.

        Raises :class:`DataError` once ``min_items`` items were seen and the skipped fraction is too high.
        """
        skipped = list(skipped)
        if seen < len(skipped):
            raise ValueError(f"seen ({seen}) counts good and skipped items, so it cannot be below {len(skipped)}")
        self.seen += int(seen)
        self.count += len(skipped)
        for item in skipped:
            self._files.setdefault(item.path, item.reason)
        if self.seen >= self.min_items:
            self.check()

    def add_batch(self, batch: dict) -> None:
        """:meth:`update` from a :func:`kdforge.data.collate` batch (good items under "label", bad under "skipped")."""
        skipped = batch.get("skipped", [])
        self.update(skipped, seen=len(batch["label"]) + len(skipped))

    @property
    def fraction(self) -> float:
        return self.count / self.seen if self.seen else 0.0

    def check(self) -> None:
        """Raise :class:`DataError` listing the bad files if the skipped fraction exceeds ``max_bad_fraction``."""
        if self.count and self.fraction > self.max_bad_fraction:
            raise DataError(
                f"{self.count} of {self.seen} images ({100 * self.fraction:.2f}%) could not be read, more than "
                f"the allowed {100 * self.max_bad_fraction:.2f}% ({self.setting} = {self.max_bad_fraction:g}):\n"
                f"{self._listing(_LISTED)}\n"
                "Check that the data path points at the data set you meant, remove or re-encode the broken files, "
                f"or raise {self.setting} if losing them is acceptable."
            )

    def report(self) -> list[Skipped]:
        """Every distinct unreadable file with the first reason it failed, in the order they were met.

        Items are ``(path, reason)`` named tuples, so ``json.dumps`` writes them as ``[path, reason]`` pairs.
        """
        return [Skipped(p, r) for p, r in self._files.items()]

    def summary(self) -> str:
        """A human-readable summary with the full list ("" when every image was read)."""
        if not self.count:
            return ""
        return (
            f"{self.count} of {self.seen} images ({100 * self.fraction:.2f}%) were unreadable and skipped "
            f"({len(self._files)} distinct files):\n{self._listing(None)}"
        )

    def _listing(self, limit: int | None) -> str:
        items = list(self._files.items())
        shown = items if limit is None else items[:limit]
        lines = [f"  {path}: {reason}" for path, reason in shown]
        if len(items) > len(shown):
            lines.append(f"  ... and {len(items) - len(shown)} more (the run's summary lists them all)")
        return "\n".join(lines)

    def state_dict(self) -> dict:
        """What a checkpoint needs so that a resumed run keeps counting where it stopped."""
        return {"seen": self.seen, "count": self.count, "files": dict(self._files)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.count = int(state["count"])
        self._files = dict(state["files"])
