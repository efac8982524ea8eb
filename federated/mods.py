"""ClientApp mods: clipping when the server asks for it, and a red-team site for drills.

``clip_when_asked`` runs Flower's ``fixedclipping_mod`` when the train config carries a
clipping norm (the server's DP wrapper sets it) and passes the message through otherwise.

``red_team`` turns a site hostile, for robustness drills and the benchmark only: it does
nothing unless the SuperNode was started with ``--node-config 'attack="..."'``. Attacks:
``sign_flip`` (send ``w - s*(w_trained - w)``: the honest update reversed and scaled by
``attack-scale``, a norm the screening lets through), ``noise`` (Gaussian noise of the honest
update's norm times ``attack-scale``), ``scale`` (the update times ``attack-scale``),
``nan`` and ``wrong_shape`` (malformed updates the screening must refuse).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from federated.records import from_array_record, to_array_record

CLIPPING_KEY = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM
ATTACKS = ("sign_flip", "noise", "scale", "nan", "wrong_shape")


def clip_when_asked(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type == MessageType.TRAIN:
        configs = list(msg.content.config_records.values())
        if configs and CLIPPING_KEY in configs[0]:
            return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def poison(
    sent: dict[str, np.ndarray], trained: dict[str, np.ndarray], attack: str, scale: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """What a hostile site returns instead of ``trained`` (see module doc)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    out: dict[str, np.ndarray] = {}
    if attack == "noise":
        norm = float(np.sqrt(sum(float(np.sum((trained[k] - sent[k]) ** 2)) for k in sent)))
        draws = {k: rng.standard_normal(v.shape) for k, v in sent.items()}
        draw_norm = float(np.sqrt(sum(float(np.sum(d**2)) for d in draws.values()))) or 1.0
        return {
            k: (sent[k] + draws[k] * (scale * norm / draw_norm)).astype(sent[k].dtype)
            for k in sent
        }
    for i, (key, base) in enumerate(sent.items()):
        delta = trained[key] - base
        if attack == "sign_flip":
            out[key] = (base - scale * delta).astype(base.dtype)
        elif attack == "scale":
            out[key] = (base + scale * delta).astype(base.dtype)
        elif attack == "nan":
            value = trained[key].copy()
            if i == 0:
                value.flat[0] = np.nan
            out[key] = value
        else:  # wrong_shape
            out[key] = trained[key].ravel()[:-1].copy() if i == 0 and trained[key].size > 1 \
                else trained[key]
    return out


def red_team(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    attack = str(ctxt.node_config.get("attack", "") or "")
    reply = call_next(msg, ctxt)
    if not attack or msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    scale = float(ctxt.node_config.get("attack-scale", 1.0))
    sent = from_array_record(next(iter(msg.content.array_records.values())))
    key = next(iter(reply.content.array_records.keys()))
    trained = from_array_record(reply.content.array_records[key])
    config = next(iter(msg.content.config_records.values()), {})
    rng = np.random.default_rng(
        [int(ctxt.node_config.get("attack-seed", 0)), int(config.get("server-round", 0))]
    )
    reply.content[key] = to_array_record(poison(sent, trained, attack, scale, rng))
    return reply
