"""Jobs over the asset graph."""

import dagster as dg

from . import LOOP_ASSETS

learning_loop_job = dg.define_asset_job(
    "learning_loop",
    selection=dg.AssetSelection.assets(*LOOP_ASSETS),
    description="Curate → train → export → quantize → benchmark → (gated) promote.",
)
