"""An example third-party kdforge plugin, installed by the tests like any package from PyPI would be.

It contributes one loss, ``example.cosine`` (1 - cosine similarity between the projected student CLS token and
the teacher's), through the ``kdforge`` entry-point group declared in its pyproject.toml.
"""

import dataclasses

import kdforge
import torch.nn.functional as F
from kdforge.losses import DistillLoss
from kdforge.students import ProjectionHead


class CosineClsLoss(DistillLoss):
    name = "example.cosine"

    @dataclasses.dataclass
    class Config:
        margin: float = 0.0
        """Cosine similarity above which no loss is paid."""

    def __init__(self, cfg, *, student_dim, teacher_dim):
        super().__init__(cfg, student_dim=student_dim, teacher_dim=teacher_dim)
        self.head = ProjectionHead(student_dim, teacher_dim)

    def forward(self, student_out, teacher_out, batch):
        cos = F.cosine_similarity(self.head(student_out.cls), teacher_out.cls.float(), dim=-1)
        loss = (1.0 - self.cfg.margin - cos).clamp_min(0).mean()
        return loss, {"cosine": float(cos.mean())}


@kdforge.hookimpl
def kdforge_register_losses():
    return [CosineClsLoss]
