"""Values assets hand each other (pickled by the IO manager; small, typed, path-based)."""


from pathlib import Path

from pydantic import BaseModel

from roadloop.data.datasets import CuratedDataset
from roadloop.data.versioning import DatasetVersion
from roadloop.evaluation.gates import GateOutcome
from roadloop.models.export import OnnxModelInfo, shape_label
from roadloop.models.quantize import QuantizedModelInfo


class CuratedDatasetVersion(BaseModel):
    dataset: CuratedDataset
    version: DatasetVersion
    data_yaml: Path
    synthetic: bool = False


class TrainedModelVersion(BaseModel):
    """A model registered in MLflow; ``model_version`` is the registry version id."""

    registered_name: str
    model_version: str
    run_id: str
    weights: Path
    imgsz: int
    class_names: list[str]
    dataset_md5: str
    metrics: dict[str, float] = {}


class OnnxModelVersion(BaseModel):
    """``info``: the primary (square) export; ``variants``: the same model at the other input
    shapes of ``export_shapes``, keyed by shape label (``"192x320"``, ``shape_label``)."""

    model_version: str
    run_id: str
    info: OnnxModelInfo
    variants: dict[str, OnnxModelInfo] = {}

    def shapes(self) -> dict[str, OnnxModelInfo]:
        """Every export by shape label, the primary first."""
        return {shape_label(self.info.input_hw): self.info, **self.variants}


class QuantizedModelVersion(BaseModel):
    """``info``: the INT8 of the primary export; ``variants``: the INT8 of each other shape."""

    model_version: str
    run_id: str
    info: QuantizedModelInfo
    variants: dict[str, QuantizedModelInfo] = {}

    def variant_files(self) -> dict[tuple[int, int], Path]:
        """``(h, w)`` → INT8 file of each non-primary shape (``FleetResource.publish``)."""
        return {parse_label(label): v.path for label, v in self.variants.items()}


def parse_label(label: str) -> tuple[int, int]:
    """``"192x320"`` → ``(192, 320)``."""
    h, w = label.split("x")
    return int(h), int(w)


class BenchmarkReportFiles(BaseModel):
    candidate_version: str
    production_version: str | None
    results_json: Path
    html: Path
    markdown: Path
    gates: list[GateOutcome]
