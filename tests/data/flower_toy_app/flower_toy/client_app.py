"""Each site returns the global array plus one, its node-config ``frames`` as weight."""

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    updated = [array + 1.0 for array in arrays]
    site = str(context.node_config["site"])
    num_examples = int(context.node_config.get("frames", 1)) or 1
    content = RecordDict(
        {
            "arrays": ArrayRecord(updated),
            "metrics": MetricRecord({"num-examples": num_examples}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content=content, reply_to=msg)
