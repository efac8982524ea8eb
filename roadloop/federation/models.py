"""The federation's configuration and records, validated at every boundary."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from roadloop.federation.flower_config import InvalidConfigError

StrategyName = Literal["fedavg", "fedprox", "trimmed_mean", "median", "krum", "multikrum", "bulyan"]
NormLayers = Literal["shared", "local"]
ROBUST_STRATEGIES: frozenset[str] = frozenset({"trimmed_mean", "median", "krum", "multikrum", "bulyan"})

# dp_delta is the probability that the (epsilon, delta) guarantee fails outright: a mechanism
# that publishes each protected unit's data in the clear with probability delta is
# (0, delta)-DP. Here the unit is a site (site-level DP, roadloop.federation.privacy), so with
# N sites delta x N is the expected number of sites one federation exposes, and the usual
# requirement is delta well below 1/N. "Well below" is taken as delta x N <= DP_MAX_EXPOSED
# = 0.01: 99 % sure that no site is exposed. N is known at training time (the sites that
# described themselves: ``dp_delta_problem(len(sites))``); at config load it is at least
# ``min_available_sites``, and never below one site, so no delta above 0.01 means anything.
DP_MAX_EXPOSED = 0.01


class FederationConfig(BaseModel):
    """How one federation runs. Flattened into Flower's run config (``to_run_config``).

    No value may be infinite or NaN: an infinite clip or noise multiplier makes the global
    model infinite, and an infinite cap or timeout silently switches its check off.
    """

    # Strict: Flower hands the run config over as TOML values, and a string is never taken
    # for a number or a bool ("yes" is no boolean, "3" no integer); an int may stand for a
    # float (TOML writes 1 for 1.0).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

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
    dp_delta: float = Field(1e-5, gt=0.0, le=DP_MAX_EXPOSED)  # see DP_MAX_EXPOSED
    # "local" keeps every normalisation layer's parameters and statistics on the site (FedBN).
    norm_layers: NormLayers = "shared"
    # Local training (Ultralytics) on each site.
    imgsz: int = Field(320, ge=32, le=1280)
    batch: int = Field(8, ge=1, le=256)
    lr0: float = Field(0.002, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed
    # Screening: an update whose L2 norm exceeds this is refused outright (absurd), and with
    # three or more replies so is one above ``max_norm_ratio`` x the round's median norm.
    max_update_norm: float = Field(1e4, gt=0.0)
    max_norm_ratio: float = Field(10.0, gt=1.0)
    # ... and one longer than this fraction of the global model's own norm, whatever the
    # number of replies: replacing the model (all zeros: 1.0, rescaling it by s: |1 - s|)
    # is refused; an honest epoch on YOLO11n moved it by 0.7-1.7 % of its norm (measured).
    max_update_to_model_ratio: float = Field(0.5, gt=0.0)
    # FedAvg's weight per site is its example count, cut to this x the round's low median
    # count: a site claiming a billion frames weighs at most this many "typical" sites.
    max_examples_ratio: float = Field(4.0, ge=1.0)
    round_timeout_s: float = Field(3600.0, gt=0.0)

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if self.min_available_sites < self.min_train_sites:
            raise ValueError("min_available_sites must be >= min_train_sites")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("fedprox needs proximal_mu > 0")
        if self.dp and self.strategy in ROBUST_STRATEGIES:
            raise ValueError("DP noise is added to the mean: use it with fedavg or fedprox")
        if self.dp:  # the smallest federation this config runs has min_available_sites sites
            problem = self.dp_delta_problem(self.min_available_sites)
            if problem:
                raise ValueError(f"with min_available_sites {self.min_available_sites}: {problem}")
        # The smallest round the config allows must meet the aggregator's own limits; every
        # round checks the same again against the updates that passed screening.
        shortfall = aggregation_shortfall(self, self.min_train_sites)
        if shortfall:
            raise ValueError(f"with min_train_sites {self.min_train_sites}: {shortfall}")
        return self

    def dp_delta_problem(self, sites: int) -> str | None:
        """Why ``dp_delta`` means nothing for a federation of ``sites`` sites, or None
        (``DP_MAX_EXPOSED``: delta x sites must stay <= 0.01)."""
        n = max(1, sites)
        if self.dp_delta * n > DP_MAX_EXPOSED:
            return (
                f"dp_delta {self.dp_delta:g} x {n} site(s) = {self.dp_delta * n:.3g} sites "
                "expected to lose their guarantee outright per federation; delta must be well "
                f"below 1/sites (at most {DP_MAX_EXPOSED:g}/{n} = {DP_MAX_EXPOSED / n:.3g})"
            )
        return None

    def multikrum_selected(self) -> int:
        """How many updates Multi-Krum averages (``multikrum_keep``; 0: sites - malicious)."""
        return self.multikrum_keep or max(1, self.min_train_sites - self.num_malicious)

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
        """The config from Flower's run config (kebab-case keys, TOML-typed values); other
        keys are the app's own and ignored. A value of the wrong type or out of range raises
        InvalidConfigError naming its key as the run config spells it."""
        fields = set(cls.model_fields)
        values: dict = {}
        spelt: dict[str, str] = {}
        for key, value in run_config.items():
            name = str(key).replace("-", "_")
            if name in fields:
                values[name] = value
                spelt[name] = str(key)
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else ""
                msg = str(err["msg"]).removeprefix("Value error, ") + _TYPE_HINTS.get(
                    err["type"], _FIELD_HINTS.get(name, "")
                )
                if name in spelt:
                    value = values[name]
                    problems.append(f"'{spelt[name]}' = {value!r} ({type(value).__name__}): {msg}")
                elif name:  # a default: cannot be wrong, but say so rather than hide it
                    problems.append(f"'{name.replace('_', '-')}': {msg}")
                else:  # the model's own consistency checks
                    problems.append(msg)
            raise InvalidConfigError("federation run config: " + "; ".join(problems)) from exc


_TYPE_HINTS = {
    "bool_type": " (a TOML boolean: true or false, unquoted)",
    "int_type": " (a TOML integer, unquoted)",
    "float_type": " (a TOML number, unquoted)",
}
_FIELD_HINTS = {
    "dp_delta": (
        " (delta is the chance the DP guarantee fails outright, and must stay well below "
        "1/sites: delta x sites <= 0.01)"
    ),
}


def aggregation_shortfall(cfg: FederationConfig, updates: int) -> str | None:
    """Why ``updates`` updates are too few for ``cfg``'s aggregator to do its job, or None.

    Below these limits the robust aggregators quietly degrade (a trimmed mean that trims
    nothing, a Multi-Krum that keeps everyone: plain means) or skip the round, so the config
    refuses them for ``min_train_sites`` and each round refuses them after screening.
    """
    f = cfg.num_malicious
    if updates < cfg.min_train_sites:
        return f"{updates} sound updates, fewer than min_train_sites {cfg.min_train_sites}"
    match cfg.strategy:
        case "trimmed_mean" if int(cfg.trim_beta * updates) < 1:  # Flower's own cut
            return (
                f"a trimmed mean with trim_beta {cfg.trim_beta:g} trims nothing from "
                f"{updates} updates (needs trim_beta x sites >= 1)"
            )
        case "krum" | "multikrum" if updates < 2 * f + 3:
            return f"Krum needs at least 2*num_malicious + 3 = {2 * f + 3} sites, got {updates}"
        case "multikrum" if cfg.multikrum_selected() > updates - f:
            return (
                f"Multi-Krum keeping {cfg.multikrum_selected()} of {updates} updates keeps a "
                f"malicious one (needs multikrum_keep <= sites - num_malicious = {updates - f})"
            )
        case "bulyan" if updates < 4 * f + 3:
            return f"Bulyan needs at least 4*num_malicious + 3 = {4 * f + 3} sites, got {updates}"
    return None


class SiteSpec(BaseModel):
    """A camera site's locally labelled frames, as the site's training node sees them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    data_yaml: Path
    frames: int = Field(ge=0)
    # Fraction of the site's labelled frames that passed label QA (1.0 when unknown).
    quality: float = Field(1.0, ge=0.0, le=1.0)


class RejectedUpdate(BaseModel):
    site: str
    node_id: int
    reason: str


class CappedWeight(BaseModel):
    """A site whose claimed example count was cut before it weighted the average."""

    site: str
    claimed: int
    used: int


class RoundRecord(BaseModel):
    """What happened in one round, as the ServerApp logged it."""

    round: int
    sites_sampled: list[str]
    sites_aggregated: list[str]
    rejected: list[RejectedUpdate] = Field(default_factory=list)
    failures: list[str] = Field(default_factory=list)
    capped_weights: list[CappedWeight] = Field(default_factory=list)
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
