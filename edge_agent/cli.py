"""``roadloop-agent`` / ``python -m edge_agent``: run a camera agent or enroll it.

    roadloop-agent run --gateway http://127.0.0.1:8700 --enroll-token TOKEN \\
        --camera-id cam-1 --source ../shared/videos/cctv_street.mp4 [--max-frames 200]
    roadloop-agent enroll --gateway URL --enroll-token TOKEN --camera-id cam-1 --state-dir DIR

``run`` prints a status line on stderr and, when it ends, one JSON summary line on stdout.
Model updates (``docs/fleet-api.md`` "Model rollouts"): the agent polls the signed manifest
every ``--update-interval`` seconds (0: off) and verifies it with ``--model-public-key``
(base64, a ``model-signing.pub`` file or a PEM; default: the key pinned at enrollment);
``--latency-budget-ms`` / ``--rollback-after N`` set when a new model rolls itself back.
SIGTERM/SIGINT stop reading, flush what can be flushed (``--drain-timeout``) and exit 0;
a second signal exits at once (queued frames stay in the outbox for the next start).
Exit codes: 0 done/stopped, 1 runtime failure (enrollment refused, source failed, another
agent holds the state dir's ``agent.lock``), 2 bad arguments or input files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_agent.errors import EdgeAgentError
from edge_agent.frame_workers import MAX_WORKERS
from edge_agent.sources import MAX_FILE_FPS
from edge_agent.uploader import DEFAULT_BATCH_MAX, MAX_UPLOAD_LINGER_S

logger = logging.getLogger("edge_agent")


# Upper bound of the agent's intervals and timeouts: longer than a day is a typo (and a
# wait of 1e300 s overflows the thread primitives the agent sleeps on).
MAX_INTERVAL_S = 86400.0
# The outbox's size cap: 1 TiB is more disk than an edge box has (and inf overflowed int()).
MAX_OUTBOX_MB = 1024.0 * 1024.0
# Intra-op threads of ONNX Runtime: more than any edge box has cores.
MAX_THREADS = 256
# The gateway's camera_id rule (roadloop.data.frame_records.ID_PATTERN, which this package may not
# import; the outbox's frame ids follow it too): the id names the default state dir
# (.roadloop-agent/<camera-id>), so "../x", "/abs" or "" must never reach a path.
_CAMERA_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")


def _float_in(lo: float, hi: float | None, *, above: bool = False,
              unit: str = "") -> Callable[[str], float]:
    """An argparse type: a finite float in [lo, hi] (``above``: lo itself excluded); nan and
    inf are refused with the same rule."""
    rule = (f"> {lo:g}" if above else f">= {lo:g}") + (
        f" and at most {hi:g}{unit}" if hi is not None else " and finite")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
        if not math.isfinite(value) or (value <= lo if above else value < lo) or (
                hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
        if value < lo or (hi is not None and value > hi):
            rule = f">= {lo}" + (f" and at most {hi}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = "integer"
    return parse


def _band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 0.25,0.5), got {text!r}") from exc
    if not 0.0 <= lo <= hi <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


_positive_float = _float_in(0.0, None, above=True)
_interval = _float_in(0.0, MAX_INTERVAL_S, above=True, unit=" s")
_fraction = _float_in(0.0, 1.0)


def _camera_id(text: str) -> str:
    if not _CAMERA_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid camera id {text!r}: must match [A-Za-z0-9_.-]{{1,64}} and not start "
            "with '.' (the gateway's rule)")
    return text


def _gateway_url(text: str) -> str:
    """An http(s) URL with a host (a malformed one was a traceback, and "notaurl" made the
    agent retry its enrollment forever)."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a URL: {text!r} ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"expected an http(s) URL with a host, e.g. http://127.0.0.1:8700, got {text!r}")
    return text


_max_fps = _float_in(0.0, MAX_FILE_FPS, above=True)
_linger_seconds = _float_in(0.0, MAX_UPLOAD_LINGER_S, unit=" s")
_positive_int = _int_in(1)
_worker_count = _int_in(1, MAX_WORKERS)


def _config_entry(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roadloop-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--gateway", required=True, type=_gateway_url,
            help="gateway base URL, e.g. http://127.0.0.1:8700",
        )
        p.add_argument(
            "--camera-id", required=True, type=_camera_id,
            help="the camera's id: [A-Za-z0-9_.-]{1,64}, not starting with '.'",
        )
        p.add_argument(
            "--enroll-token", default=None, help="one-time token (needed on first start)"
        )
        p.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help="device identity + outbox (default ./.roadloop-agent/<camera-id>)",
        )

    run = sub.add_parser("run", help="stream a source through the detector to the gateway")
    common(run)
    run.add_argument("--source", required=True, help="video file, image folder or rtsp/http URL")
    run.add_argument(
        "--model",
        type=Path,
        default=None,
        help="ONNX model (default: ../shared/models/atl_v2_yolo11n_gpu_320.onnx, else "
        "atl_v2_yolo11n_320.onnx, searched)",
    )
    run.add_argument("--max-frames", type=_positive_int, default=None, metavar="N")
    run.add_argument("--heartbeat-interval", type=_interval, default=30.0, metavar="S")
    run.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pace files at their fps and drop stale frames (default) or read as fast as possible",
    )
    run.add_argument("--loop", action="store_true", help="replay a file source forever")
    run.add_argument("--image-fps", type=_positive_float, default=5.0,
                     help="the rate a folder of images was taken at (frames/s): its clock for "
                     "tracking and speeds")
    run.add_argument(
        "--max-fps", type=_max_fps, default=None, metavar="FPS",
        help="measure at most this many frames a second, by the source's clock (the others "
        "are skipped before inference: a CPU budget for the camera; counting tracks well "
        "down to about 8 fps, docs/traffic.md); default: every frame the loop keeps up with")
    run.add_argument("--conf", type=_fraction, default=0.25, help="detector confidence threshold")
    run.add_argument("--iou", type=_fraction, default=0.7, help="NMS IoU threshold")
    run.add_argument("--threads", type=_int_in(1, MAX_THREADS), default=None,
                     help="ONNX Runtime intra-op threads")
    run.add_argument(
        "--workers", type=_worker_count, default=1, metavar="N",
        help="frames measured at once (network, NMS, quality), each on its own thread with "
        "ONNX Runtime on one intra-op thread unless --threads is given; counting and "
        "sampling stay in frame order. 2 on a 2-core box: 1.2-1.3x the frames/s of 1 with 2 "
        "intra-op threads (benchmarks/results/agent_speed.md)",
    )
    run.add_argument(
        "--ort-config", type=_config_entry, action="append", default=[], metavar="KEY=VALUE",
        help="ONNX Runtime session config entries for every model loaded (repeatable; replace "
        "the default session.intra_op.allow_spinning=0), e.g. ...allow_spinning=1 on a "
        "dedicated box",
    )
    run.add_argument(
        "--capacity", type=_positive_float, default=30.0, help="objects in a full view"
    )
    run.add_argument(
        "--traffic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="track and count vehicles when the camera's configuration has a traffic geometry",
    )
    run.add_argument("--base-rate", type=_fraction, default=0.01, help="random share sampled")
    run.add_argument("--low-conf-band", type=_band, default=(0.25, 0.5), metavar="LO,HI")
    run.add_argument("--rare-classes", default="", help="comma-separated class names")
    run.add_argument("--crowded-threshold", type=_int_in(0), default=20)
    run.add_argument(
        "--hourly-budget",
        type=_float_in(0.0, None),
        default=360.0,
        help="frames per hour per camera (0 = unlimited)",
    )
    run.add_argument("--budget-policy", choices=["importance", "stop"], default="importance")
    run.add_argument(
        "--no-condition-samplers",
        action="store_true",
        help="only the base-rate sampler (low-confidence/rare/crowded/edge-case off)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--outbox-max-mb", type=_float_in(0.0, MAX_OUTBOX_MB, above=True),
                     default=512.0, metavar="MB")
    run.add_argument("--retry-base", type=_interval, default=1.0, metavar="S")
    run.add_argument("--retry-max-delay", type=_interval, default=60.0, metavar="S")
    run.add_argument(
        "--upload-batch-max",
        type=_positive_int,
        default=DEFAULT_BATCH_MAX,
        metavar="N",
        help=f"frames per POST /v1/frames/batch when several are queued (default "
        f"{DEFAULT_BATCH_MAX}, the gateway's default max_batch_frames; 1: one request per "
        "frame); a gateway without batches gets one request per frame anyway",
    )
    run.add_argument(
        "--upload-linger",
        type=_linger_seconds,
        default=0.0,
        metavar="S",
        help="hold fresh frames up to S seconds so that several share one request (0: send "
        "at once); large fleets: 60 (docs/capacity.md)",
    )
    run.add_argument(
        "--drain-timeout",
        type=_float_in(0.0, MAX_INTERVAL_S, unit=" s"),
        default=10.0,
        metavar="S",
        help="at exit, wait this long for the outbox to empty",
    )
    run.add_argument("--status-interval", type=_interval, default=None, metavar="S")
    run.add_argument(
        "--model-public-key",
        default=None,
        metavar="KEY|FILE",
        help="Ed25519 key that signs model manifests: base64, model-signing.pub or PEM "
        "(default: the key the gateway handed out at enrollment)",
    )
    run.add_argument(
        "--update-interval",
        type=_float_in(0.0, MAX_INTERVAL_S, unit=" s"),
        default=60.0,
        metavar="S",
        help="poll the model manifest every S seconds (0 = no model updates)",
    )
    run.add_argument(
        "--latency-budget-ms",
        type=_positive_float,
        default=None,
        help="roll a new model back when its detect P95 exceeds this "
        "(default: 3x the previous model's P95)",
    )
    run.add_argument(
        "--rollback-after",
        type=_positive_int,
        default=3,
        metavar="N",
        help="consecutive bad heartbeat windows before a new model rolls itself back",
    )
    run.add_argument(
        "--max-error-rate",
        type=_fraction,
        default=0.01,
        help="detector failures per frame above which a heartbeat window is bad",
    )
    run.add_argument(
        "--shadow-rate",
        type=_float_in(0.0, 1.0, above=True),
        default=0.2,
        help="share of frames a shadow candidate runs on (0 < r <= 1)",
    )
    run.add_argument(
        "--metrics-port",
        type=_int_in(0, 65535),
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on this port (docs/monitoring.md; 0: any free port)",
    )
    run.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address the metrics server binds (no authentication: loopback by default)",
    )
    run.add_argument(
        "--redaction-faces", choices=("centerface", "none"), default="centerface",
        help="face detector for redaction (docs/privacy.md); people come from the model",
    )
    run.add_argument(
        "--redaction-plates", choices=("auto", "haar", "none"), default="auto",
        help="licence-plate detector for redaction (auto: where this OpenCV has one)",
    )

    enroll = sub.add_parser("enroll", help="enroll the camera and save its identity, then exit")
    common(enroll)
    return parser


def _state_dir(args: argparse.Namespace) -> Path:
    return args.state_dir or Path(".roadloop-agent") / args.camera_id


def _state_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be the state dir (it, or a folder above it, is a file), or None;
    checked before anything is created there."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                what = "is not a folder" if candidate == path else f"is under {candidate}, a file"
                return f"state dir {path} {what}"
            return None
    return None


def _install_signal_handlers(agent) -> dict[int, Any]:
    """SIGTERM/SIGINT stop the agent; returns the handlers they replace, for restoring."""
    count = {"n": 0}

    def handler(signum: int, _frame) -> None:
        count["n"] += 1
        name = signal.Signals(signum).name
        if count["n"] == 1:
            logger.warning("%s received: stopping (flushing the outbox; again to exit now)", name)
            agent.request_stop()
        else:
            logger.warning("%s received again: exiting without flushing", name)
            agent.request_stop(force=True)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, handler)
    return previous


def _cmd_enroll(args: argparse.Namespace) -> int:
    from edge_agent.agent import agent_version
    from edge_agent.client import GatewayClient
    from edge_agent.fsutil import StateDirLock

    # The same lock as `run`: enrolling into a state dir a running agent uses would rewrite
    # the identity under it (StateDirLocked, exit 1, names the holder's pid).
    with StateDirLock(_state_dir(args)):
        client = GatewayClient(args.gateway, _state_dir(args))
        try:
            ident = client.ensure_enrolled(args.camera_id, args.enroll_token, agent_version())
        finally:
            client.close()
    print(
        json.dumps(
            {
                "device_id": ident.device_id,
                "camera_id": ident.camera_id,
                "state_dir": str(_state_dir(args)),
            }
        )
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.agent import AgentConfig, EdgeAgent, find_default_model
    from edge_agent.errors import GatewayUnavailable
    from edge_agent.samplers import SamplerConfig

    model = args.model or find_default_model()
    if model is None or not Path(model).is_file():
        what = (
            f"{model} not found"
            if model
            else "no --model, and neither ../shared/models/atl_v2_yolo11n_gpu_320.onnx nor "
            "atl_v2_yolo11n_320.onnx found"
        )
        print(f"error: {what}; pass --model PATH", file=sys.stderr)
        return 2
    if args.model_public_key:
        from edge_agent.manifest import load_public_key

        load_public_key(args.model_public_key)  # PublicKeyError (exit 2) names the problem
    rare = frozenset(c.strip() for c in args.rare_classes.split(",") if c.strip())
    sampler = SamplerConfig(
        base_rate=args.base_rate,
        low_confidence_band=args.low_conf_band,
        rare_classes=rare,
        crowded_threshold=args.crowded_threshold,
        hourly_budget=args.hourly_budget or None,
        budget_policy=args.budget_policy,
        seed=args.seed,
    )
    if args.no_condition_samplers:
        sampler.low_confidence_band = (1.0, 1.0)
        sampler.rare_classes = frozenset()
        sampler.crowded_threshold = 10**9
        sampler.edge_cases = False
    config = AgentConfig(
        gateway_url=args.gateway,
        camera_id=args.camera_id,
        source=args.source,
        model_path=Path(model),
        state_dir=_state_dir(args),
        enroll_token=args.enroll_token,
        max_frames=args.max_frames,
        heartbeat_interval_s=args.heartbeat_interval,
        realtime=args.realtime,
        loop=args.loop,
        image_fps=args.image_fps,
        max_fps=args.max_fps,
        conf_threshold=args.conf,
        iou_threshold=args.iou,
        intra_op_threads=args.threads,
        inference_workers=args.workers,
        **({"session_config": dict(args.ort_config)} if args.ort_config else {}),
        capacity=args.capacity,
        sampler=sampler,
        outbox_max_bytes=int(args.outbox_max_mb * 1024 * 1024),
        retry_base_s=args.retry_base,
        retry_max_s=max(args.retry_max_delay, args.retry_base),
        upload_batch_max=args.upload_batch_max,
        upload_linger_s=args.upload_linger,
        drain_timeout_s=args.drain_timeout,
        status_interval_s=args.status_interval,
        model_public_key=args.model_public_key,
        update_interval_s=args.update_interval,
        latency_budget_ms=args.latency_budget_ms,
        rollback_after=args.rollback_after,
        max_error_rate=args.max_error_rate,
        shadow_sample_rate=args.shadow_rate,
        traffic=args.traffic,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        redaction_faces=args.redaction_faces,
        redaction_plates=args.redaction_plates,
    )
    agent = EdgeAgent(config)
    previous_handlers = _install_signal_handlers(agent)
    try:
        summary = agent.run()
    except GatewayUnavailable:
        if agent._stop.is_set():  # stopped by a signal while waiting for the gateway to enroll
            logger.warning("stopped before the gateway could be reached; nothing was processed")
            return 0
        raise
    finally:  # main() may run inside another program (tests, a supervisor): give signals back
        for sig, prev in previous_handlers.items():
            signal.signal(sig, prev)
    print(json.dumps(summary.to_dict()), flush=True)
    if summary.stopped_by == "source_error":  # a supervisor should see it, and restart
        print("error: the frame source failed or gave no readable frame "
              f"({summary.source_read_errors} read errors; the log names them)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a refused argument (2; argparse said why)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    problem = _state_dir_problem(_state_dir(args))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    from edge_agent.errors import EnrollmentError, GatewayError, GatewayUnavailable
    from edge_agent.fsutil import StateDirLocked
    from edge_agent.outbox import OutboxError
    from edge_agent.sources import SourceError

    try:
        if args.command == "enroll":
            return _cmd_enroll(args)
        return _cmd_run(args)
    except StateDirLocked as exc:  # a runtime conflict, not a bad argument: a supervisor retries
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (SourceError, OutboxError, EdgeAgentError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GatewayUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (EnrollmentError, GatewayError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
