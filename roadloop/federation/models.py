"""The federation's configuration and records, validated at every boundary."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StrategyName = Literal["fedavg", "fedprox", "trimmed_mean", "median", "krum", "multikrum", "bulyan"]
NormLayers = Literal["shared", "local"]
ROBUST_STRATEGIES: frozenset[str] = frozenset({"trimmed_mean", "median", "krum", "multikrum", "bulyan"})


class FederationConfig(BaseModel):
    """How one federation runs. Flattened into Flower's run config (``to_run_config``)."""

    model_config = ConfigDict(extra="forbid")

    strategy: StrategyName = "fedavg"
    rounds: int = Field(3, ge=1, le=1000)
    local_epochs: int = Field(1, ge=1, le=100)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    min_train_sites: int = Field(2, ge=1)
    min_available_sites: int = Field(2, ge=1)
    # Site selection (roadloop.federation.selection): floors a site must meet to be drawn.
    min_site_frames: int = Field(10, ge=0)
    min_site_quality: float = Field(0.5, ge=0.0, le=1.0)
    # FedProx's proximal weight (mu/2 * ||w - w_global||^2 added to each site's loss).
    proximal_mu: float = Field(0.0, ge=0.0)
    # Byzantine-robust aggregators: the fraction trimmed at each end (trimmed mean) and the
    # number of faulty sites the aggregator is built to tolerate (Krum, Multi-Krum, Bulyan).
    trim_beta: float = Field(0.2, ge=0.0, lt=0.5)
    num_malicious: int = Field(1, ge=0)
    multikrum_keep: int = Field(0, ge=0)  # updates Multi-Krum averages; 0: sites - malicious
    # Client-side DP (Flower's fixed clipping wrappers): each site's update is clipped to
    # ``dp_clipping_norm`` and the server adds Gaussian noise of ``dp_noise_multiplier`` x clip.
    dp: bool = False
    dp_noise_multiplier: float = Field(1.1, gt=0.0)
    dp_clipping_norm: float = Field(1.0, gt=0.0)
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    # "local" keeps every normalisation layer's parameters and statistics on the site (FedBN).
    norm_layers: NormLayers = "shared"
    # Local training (Ultralytics) on each site.
    imgsz: int = Field(320, ge=32, le=1280)
    batch: int = Field(8, ge=1, le=256)
    lr0: float = Field(0.002, gt=0.0, le=1.0)
    seed: int = 0
    # Screening: an update whose L2 norm exceeds this is refused outright (absurd), and with
    # three or more replies so is one above ``max_norm_ratio`` x the round's median norm.
    max_update_norm: float = Field(1e4, gt=0.0)
    max_norm_ratio: float = Field(10.0, gt=1.0)
    round_timeout_s: float = Field(3600.0, gt=0.0)

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if self.min_available_sites < self.min_train_sites:
            raise ValueError("min_available_sites must be >= min_train_sites")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("fedprox needs proximal_mu > 0")
        if self.strategy == "bulyan" and self.min_train_sites < 4 * self.num_malicious + 3:
            raise ValueError("Bulyan needs at least 4*num_malicious + 3 sites per round")
        if self.strategy in {"krum", "multikrum"} and self.min_train_sites < 2 * self.num_malicious + 3:
            raise ValueError("Krum needs at least 2*num_malicious + 3 sites per round")
        if self.dp and self.strategy in ROBUST_STRATEGIES:
            raise ValueError("DP noise is added to the mean: use it with fedavg or fedprox")
        return self

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """Flower run config: flat, kebab-case, no None (Flower's config values are scalars)."""
        out: dict[str, str | int | float | bool] = {}
        for key, value in self.model_dump().items():
            if value is None:
                continue
            out[key.replace("_", "-")] = value
        return out

    @classmethod
    def from_run_config(cls, run_config: dict) -> FederationConfig:
        fields = set(cls.model_fields)
        values = {}
        for key, value in run_config.items():
            name = str(key).replace("-", "_")
            if name in fields:
                values[name] = value
        return cls(**values)


class SiteSpec(BaseModel):
    """A camera site's locally labelled frames, as the site's training node sees them."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    data_yaml: Path
    frames: int = Field(ge=0)
    # Fraction of the site's labelled frames that passed label QA (1.0 when unknown).
    quality: float = Field(1.0, ge=0.0, le=1.0)


class RejectedUpdate(BaseModel):
    site: str
    node_id: int
    reason: str


class RoundRecord(BaseModel):
    """What happened in one round, as the ServerApp logged it."""

    round: int
    sites_sampled: list[str]
    sites_aggregated: list[str]
    rejected: list[RejectedUpdate] = Field(default_factory=list)
    failures: list[str] = Field(default_factory=list)
    train_metrics: dict[str, float] = Field(default_factory=dict)
    eval_metrics: dict[str, float] = Field(default_factory=dict)
    bytes_to_site: int = 0  # per site, the global model sent
    bytes_from_site: dict[str, int] = Field(default_factory=dict)
    epsilon: float | None = None  # cumulative (epsilon, dp_delta)-DP after this round
    seconds: float = 0.0


class FederationResult(BaseModel):
    """The outcome a ServerApp writes (JSON beside the final weights)."""

    config: FederationConfig
    sites: list[str]
    rounds: list[RoundRecord]
    weights: Path  # final global model, an Ultralytics checkpoint
    initial_eval: dict[str, float] = Field(default_factory=dict)
    epsilon: float | None = None
    dp_delta: float | None = None
