"""Values assets hand each other (pickled by the IO manager; small, typed, path-based)."""


from pathlib import Path

from pydantic import BaseModel

from roadloop.data.datasets import CuratedDataset
from roadloop.data.versioning import DatasetVersion
from roadloop.evaluation.gates import GateOutcome
from roadloop.models.export import OnnxModelInfo
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
    model_version: str
    run_id: str
    info: OnnxModelInfo


class QuantizedModelVersion(BaseModel):
    model_version: str
    run_id: str
    info: QuantizedModelInfo


class BenchmarkReportFiles(BaseModel):
    candidate_version: str
    production_version: str | None
    results_json: Path
    html: Path
    markdown: Path
    gates: list[GateOutcome]
