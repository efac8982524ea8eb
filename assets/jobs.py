"""Jobs over the asset graph."""

import dagster as dg

from . import LOOP_ASSETS, model_rollout

learning_loop_job = dg.define_asset_job(
    "learning_loop",
    selection=dg.AssetSelection.assets(*LOOP_ASSETS),
    description="Curate → train → export → quantize → benchmark → (gated) promote.",
)

model_rollout_job = dg.define_asset_job(
    "model_rollout_job",
    selection=dg.AssetSelection.assets(model_rollout),
    description="Publish the production version to the fleet as a signed, staged rollout.",
)
