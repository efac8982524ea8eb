"""Federated training settings as a resource: which strategy, how many rounds, which sites."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from roadloop.federation.models import FederationConfig


class FederationResource(dg.ConfigurableResource):
    """How ``trained_model`` federates when asked to (``source: federated``).

    ``sites_dir`` holds one folder per camera site with its locally labelled frames
    (``<site>/data.yaml``); empty: the sites are cut from the labelled sources
    (``roadloop.federation.sites``), which is what a local deployment trains on. Every
    field of :class:`~roadloop.federation.models.FederationConfig` can be overridden with
    ``config_overrides`` (e.g. ``{"strategy": "median"}``).
    """

    strategy: str = "fedavg"
    rounds: int = 3
    local_epochs: int = 1
    imgsz: int = 320
    batch: int = 8
    min_train_sites: int = 2
    sites_dir: str = ""
    manaus_sites: int = 3
    config_overrides: dict = {}  # noqa: RUF012 (a pydantic field: defaults are copied)
    # Robustness drills: site -> red-team attack its node plays (federated/mods.py), e.g.
    # {"manaus_mix1": "sign_flip"}; the screening and the aggregator must hold.
    drills: dict = {}  # noqa: RUF012
    # Site -> its cameras at the gateway; a site none of whose cameras the gateway heard from
    # within `live_within_hours` is not drawn. Empty: liveness is not checked.
    site_cameras: dict = {}  # noqa: RUF012
    live_within_hours: float = 24.0

    def federation_config(self) -> FederationConfig:
        values = {
            "strategy": self.strategy,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "imgsz": self.imgsz,
            "batch": self.batch,
            "min_train_sites": self.min_train_sites,
            "min_available_sites": self.min_train_sites,
        }
        if self.strategy == "fedprox":
            values["proximal_mu"] = 0.01
        values.update(self.config_overrides)
        return FederationConfig(**values)

    def sites_path(self) -> Path | None:
        return Path(self.sites_dir) if self.sites_dir else None
