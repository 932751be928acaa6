"""Numeric ranges of config fields: ``lr: PositiveFloat = 5e-4`` or ``Annotated[int, Range(ge=0, le=256)]``.

:func:`kdforge.recipe.schema.build` checks them when a recipe is resolved (before anything is built or written)
and names the key and the allowed range when a value is outside it. This module imports nothing of kdforge, so
every component's Config can use it.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

__all__ = [
    "Range", "PositiveInt", "NonNegativeInt", "PositiveFloat", "NonNegativeFloat", "Fraction", "Seed", "Workers",
    "ImageSide", "ItemCount", "ColourStd",
]


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric recipe field allows: lower bound ``ge`` (>=) or ``gt`` (>), upper bound ``le`` (<=) or
    ``lt`` (<); None leaves that side open. Used as ``Annotated[float, Range(gt=0)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)
        )  # fmt: skip

    def describe(self) -> str:
        """'> 0', '>= 1', 'in [0, 1]', 'in [0, 1)' ..."""
        lo = (f"[{_number(self.ge)}", f">= {_number(self.ge)}") if self.ge is not None else \
            (f"({_number(self.gt)}", f"> {_number(self.gt)}") if self.gt is not None else None
        hi = (f"{_number(self.le)}]", f"<= {_number(self.le)}") if self.le is not None else \
            (f"{_number(self.lt)})", f"< {_number(self.lt)}") if self.lt is not None else None
        if lo and hi:
            return f"in {lo[0]}, {hi[0]}"
        return (lo or hi or ("", "any number"))[1]


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


#: Aliases for the ranges most fields need.
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
#: Seeds feed torch.Generator.manual_seed after mixing with epochs and steps; 32 bits keep every mix in range.
Seed = Annotated[int, Range(ge=0, le=2**32 - 1)]
#: DataLoader worker processes: each is a process with its own copy of the dataset's Python objects.
Workers = Annotated[int, Range(ge=0, le=256)]
#: The side of an image in pixels (one 8192 x 8192 RGB float image is already 800 MB).
ImageSide = Annotated[int, Range(ge=1, le=8192)]
#: How many items a generated data set holds (its index tables live in memory).
ItemCount = Annotated[int, Range(ge=0, le=100_000_000)]
#: Per-channel (RGB) standard deviations of input normalisation: each divides the image, so each must be > 0.
ColourStd = tuple[PositiveFloat, PositiveFloat, PositiveFloat]
