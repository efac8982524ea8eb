"""FedAvg over one small array; writes which sites each round aggregated to ``result-path``."""

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class RecordingFedAvg(FedAvg):
    """FedAvg that remembers the sites whose replies each round aggregated."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rounds: list[dict] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sites = sorted(
            str(msg.content["site"]["name"]) for msg in replies if not msg.has_error()
        )
        self.rounds.append({"round": server_round, "sites": sites})
        return super().aggregate_train(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config["fail-on-purpose"]:
        raise RuntimeError("failing on purpose")
    rounds = int(context.run_config["num-server-rounds"])
    min_nodes = int(context.run_config["min-nodes"])
    strategy = RecordingFedAvg(
        fraction_evaluate=0.0, min_train_nodes=min_nodes, min_available_nodes=min_nodes
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(3, dtype=np.float32)]),
        num_rounds=rounds,
        timeout=60,
    )
    final = result.arrays.to_numpy_ndarrays()[0].tolist()
    out = Path(str(context.run_config["result-path"]))
    out.write_text(json.dumps({"rounds": strategy.rounds, "final": final}))
