"""The site's ClientApp, run by a SuperNode on the camera site's training node.

The node's configuration (``flower-supernode --node-config``) says which site it is and
where its locally labelled frames are: ``site``, ``data-yaml``, ``frames``, ``quality``,
``work-dir`` (node-local state, e.g. FedBN's normalisation layers) and optionally
``template-weights`` (the architecture's checkpoint; defaults to the run's
``initial-weights``). Frames never leave the node: only weights and counts do.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federated.mods import clip_when_asked, red_team
from federated.records import NUM_EXAMPLES, Layout, pack, weights_of
from roadloop.federation.models import FederationConfig, SiteSpec

# red_team sits outside clipping: a hostile site does not clip its own update.
app = ClientApp(mods=[red_team, clip_when_asked])


def site_of(context: Context) -> SiteSpec:
    node = context.node_config
    return SiteSpec(
        name=str(node["site"]),
        data_yaml=Path(str(node["data-yaml"])),
        frames=int(node.get("frames", 0)),
        quality=float(node.get("quality", 1.0)),
    )


def _work_dir(context: Context, site: SiteSpec) -> Path:
    base = str(context.node_config.get("work-dir", "") or "")
    path = Path(base) if base else Path.home() / ".roadloop-federation" / site.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _template(context: Context) -> Path:
    return Path(str(context.node_config.get("template-weights", "") or
                    context.run_config["initial-weights"]))


@app.query()
def describe(msg: Message, context: Context) -> Message:
    site = site_of(context)
    info = ConfigRecord({"site": site.name, "frames": site.frames, "quality": site.quality})
    return Message(content=RecordDict({"site": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from roadloop.federation.local_training import train_on_site

    site = site_of(context)
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    config = next(iter(msg.content.config_records.values()))
    mu = float(config.get("proximal-mu", cfg.proximal_mu))
    cfg = cfg.model_copy(update={
        "proximal_mu": mu,
        "local_epochs": int(config.get("local-epochs", cfg.local_epochs)),
    })
    layout = Layout.from_config(config)
    global_arrays = weights_of(next(iter(msg.content.array_records.values())), layout)
    update = train_on_site(
        global_arrays, site, cfg, template_checkpoint=_template(context),
        work_dir=_work_dir(context, site), server_round=int(config.get("server-round", 0)),
    )
    metrics = {NUM_EXAMPLES: int(update.num_examples)}
    metrics.update({k: float(v) for k, v in update.metrics.items()})
    content = RecordDict({"arrays": pack(update.arrays, layout),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from roadloop.federation.local_training import evaluate_arrays

    site = site_of(context)
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    config = next(iter(msg.content.config_records.values()))
    arrays = weights_of(next(iter(msg.content.array_records.values())), Layout.from_config(config))
    metrics = evaluate_arrays(
        arrays, site.data_yaml, split="val", template_checkpoint=_template(context),
        imgsz=cfg.imgsz, work_dir=_work_dir(context, site) / "eval",
    )
    out = {NUM_EXAMPLES: int(metrics.get("num_examples", 1)) or 1}
    out.update({k: float(v) for k, v in metrics.items() if k != "num_examples"})
    return Message(content=RecordDict({"metrics": MetricRecord(out)}), reply_to=msg)
