"""Built-in metric loggers: JSONL (always) and TensorBoard. Loggers are plugins of kind ``loggers``."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import ClassVar

from kdforge.plugins import hookimpl


class MetricLogger:
    """Contract: ``__init__(cfg, run_dir)``, ``log(step, metrics)`` and ``close()``."""

    name: ClassVar[str]

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlLogger(MetricLogger):
    """One JSON object per line in <run_dir>/metrics.jsonl (appended on resume)."""

    name = "jsonl"

    @dataclasses.dataclass
    class Config:
        filename: str = "metrics.jsonl"
        """File name inside the run directory."""

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        self._f = (self.run_dir / cfg.filename).open("a", encoding="utf-8")

    def log(self, step, metrics):
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (v if isinstance(v, (int, str)) or math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()


class TensorBoardLogger(MetricLogger):
    """Scalars to <run_dir>/tb (``tensorboard --logdir runs``)."""

    name = "tensorboard"

    @dataclasses.dataclass
    class Config:
        subdir: str = "tb"
        """Event-file directory inside the run directory."""

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(self.run_dir / cfg.subdir))

    def log(self, step, metrics):
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._w.add_scalar(k, v, step)

    def close(self):
        self._w.close()


@hookimpl
def kdforge_register_loggers():
    return [JsonlLogger, TensorBoardLogger]
