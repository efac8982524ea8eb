"""Training and export configuration as a resource: environments differ by these values."""

from __future__ import annotations

import dagster as dg

from roadloop.models.shapes import export_shapes
from roadloop.models.training import TrainConfig


class TrainerResource(dg.ConfigurableResource):
    """Ultralytics training settings (model/start weights, image size, epochs, device)."""

    model: str = "yolo11n.pt"
    imgsz: int = 320
    epochs: int = 5
    batch: int = 16
    device: str = "auto"
    workers: int = 0
    seed: int = 0
    fraction: float = 1.0
    # Input shapes the model is exported, quantized, gated and rolled out at (settings
    # ``export_shapes``; roadloop.models.shapes): the square one first, the primary artifact.
    export_shapes: list[str] = ["square", "16:9"]  # noqa: RUF012 (pydantic copies defaults)

    def shapes(self, imgsz: int) -> list[tuple[int, int]]:
        """``(h, w)`` of every export at ``imgsz``, the square first."""
        return export_shapes(self.export_shapes, imgsz)

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            model=self.model,
            imgsz=self.imgsz,
            epochs=self.epochs,
            batch=self.batch,
            device=self.device,
            workers=self.workers,
            seed=self.seed,
            fraction=self.fraction,
        )
