"""Where the serving graph's time goes on the GPU, and two candidate changes measured beside it.

Issue 15's GPU goal is end to end ≥ 70 % of the network alone at batch 32; the serving graph
alone (frames already on the device) reached 71–72 % there, so the graph itself must get
cheaper (docs/gpu.md). This says which part costs what, each part a model of its own on the
device (inputs bound on the device, outputs left there, best of the timed runs' throughput):

| row | what |
|---|---|
| `network` | the detector alone (converted to fp16 as the serving graph does, for fp16) |
| `pre` | the serving graph's preprocessing alone: uint8 BGR frames → letterboxed float RGB |
| `post` | its postprocessing alone, fed the detector's real output for the same frames |
| `serving` | the whole serving graph |
| `pre_resize_u8` | the uint8 frames reordered and resized first, float conversion on the small image (``resize="uint8_first"``; its check shows ONNX Runtime's CUDA kernel gets uint8 wrong) |
| `pre_separable`, `serving_separable` | candidate: width then height resized on the NHWC float frames, NCHW and RGB on the resized image (``resize="separable"``) |
| `pre_upto_<step>`, `pre_separable_upto_<step>` | the preprocessing cut after each of its steps (first precision, largest batch): the increments say which step costs what |
| `post_cand_1024`, `serving_cand_1024` | candidate: 1024 anchors per image into NMS instead of 4096 |
| `post_chunk_1` | candidate: one image per NMS batch row instead of 8 (32 rows at batch 32) |
| `post_chunk_16`, `post_chunk_32_cand_1024` | candidates: fewer NMS calls (each waits for the device): 16 images per row; 32 with 1024 anchors an image, so a row's suppression mask stays near the shipped one's size |
| `post_upto_<step>` | the postprocessing cut after its main steps (decode, candidates, offsets, NMS, dense scores, final TopK; first precision, largest batch) |

Each candidate is also checked against what ships: the preprocessing's largest difference
in grey levels, and the postprocessing's detections (counts, classes, boxes, scores). The cut
preprocessing models time each step on the device as it runs in the graph; ONNX Runtime's own
profiler would time only the kernel launches of the CUDA provider, not the kernels.

    python -m benchmarks.gpu_graph_split --onnx detector_640.onnx --video frames.mp4 \\
        --device cuda --precisions fp32,fp16 --batches 8,32 --out benchmarks/results

``--device cpu`` runs the same on ONNX Runtime's CPU provider (a check of the script, not a
figure to quote). Writes ``gpu_graph_split.{json,md}`` under ``--out`` (``_cpu`` in the
names on CPU) after every row, so a run cut short keeps what it measured.

Every row is an ONNX Runtime session with the same host CPU budget, ``--threads N`` (default
``benchmarks.gpu_serving.DEFAULT_THREADS``, as the serving benchmark): ``intra_op_num_threads=N``,
inter-op 1; no torch engine runs here. Both files record the budget and the load average at
the start and at the latest row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.gpu_serving import DEFAULT_THREADS, _machine, _row, load_frames, timed
from edge_agent.inference import DEFAULT_CONF_THRESHOLD, DEFAULT_IOU_THRESHOLD
from roadloop.fsutil import write_text_atomic
from roadloop.serving import graph as serving_graph
from roadloop.serving import letterbox, nms
from roadloop.serving.onnx_builder import dims


def post_model(frame_hw: tuple[int, int], input_hw: tuple[int, int], nc: int, anchors: int,
               like: onnx.ModelProto, *, max_candidates: int = nms.MAX_CANDIDATES,
               chunk: int = nms.NMS_CHUNK) -> onnx.ModelProto:
    model, _ = nms.postprocess_model(
        frame_hw, input_hw, "B", nc, anchors, conf=DEFAULT_CONF_THRESHOLD,
        iou=DEFAULT_IOU_THRESHOLD, max_det=300, max_candidates=max_candidates, like=like,
        nms_chunk=chunk)
    return model


PRE_SHAPE_OPS = ("Shape", "Slice", "Concat")
# Where the postprocessing is cut: decoded boxes and best class, the candidates (when the
# model has more anchors than enter NMS), the offset boxes, NMS, the dense scores, the final
# TopK; each name is a node output without the prefix, skipped where the graph has none.
POST_CUTS = ("best_score2", "cand_0", "shifted", "selected", "dense", "topk_0")


def _pre_step(node: onnx.NodeProto) -> bool:
    return node.op_type not in PRE_SHAPE_OPS


def _post_step(node: onnx.NodeProto) -> bool:
    return node.output[0].removeprefix(nms.POST_PREFIX) in POST_CUTS


def cut_steps(model: onnx.ModelProto, prefix: str,
              keep: Callable[[onnx.NodeProto], bool]) -> list[tuple[str, onnx.ModelProto]]:
    """``model`` cut after each node ``keep`` picks: a model of the nodes up to it whose output
    is that node's first output, named without ``prefix``, in graph order."""
    typed = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    typed.update({v.name: v for v in model.graph.output})
    cuts = []
    for i, node in enumerate(model.graph.node):
        if not keep(node) or node.output[0] not in typed:
            continue
        out = node.output[0]
        graph = onnx.helper.make_graph(
            list(model.graph.node[: i + 1]), f"cut_{i}", list(model.graph.input), [typed[out]],
            initializer=list(model.graph.initializer))
        cut = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
        cut.ir_version = model.ir_version
        cuts.append((out.removeprefix(prefix), cut))
    return cuts


class Runner:
    """One model in one session, inputs bound on the device, outputs left there."""

    def __init__(self, name: str, model: onnx.ModelProto | Path, device: str,
                 threads: int = DEFAULT_THREADS) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # the same host budget for every row
        opts.inter_op_num_threads = 1
        # gpu_run.sh split: verbose session logs, so that the placement of every node is on
        # record (which, if any, ran off the GPU), each row's lines after its name.
        verbose = os.environ.get("ROADLOOP_SPLIT_VERBOSE") == "1"
        opts.log_severity_level = 0 if verbose else 3
        if verbose:
            print(f"row {name}", file=sys.stderr, flush=True)
        providers = (["CUDAExecutionProvider"] if device == "cuda"
                     else ["CPUExecutionProvider"])
        source = str(model) if isinstance(model, Path) else model.SerializeToString()
        self.session = ort.InferenceSession(source, opts, providers=providers)
        self.device = device
        self.input = self.session.get_inputs()[0].name

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input: x})

    def time(self, x: np.ndarray, seconds: float) -> list[float]:
        """Durations of runs on ``x`` bound on the device (five untimed runs first)."""
        io = self.session.io_binding()
        io.bind_ortvalue_input(self.input, ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(x), self.device, 0))
        for out in self.session.get_outputs():
            io.bind_output(out.name, self.device)
        for _ in range(5):
            self.session.run_with_iobinding(io)
        return timed(lambda: self.session.run_with_iobinding(io), seconds=seconds,
                     warmup_s=0.0, min_iters=5)


def same_detections(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
    boxes_a, scores_a, classes_a, count_a = a
    boxes_b, scores_b, classes_b, count_b = b
    same_count = bool((count_a == count_b).all())
    out: dict[str, Any] = {"counts_equal": same_count,
                           "detections": int(count_a.sum()), "candidate_detections":
                           int(count_b.sum())}
    if same_count:
        out.update(classes_equal=bool((classes_a == classes_b).all()),
                   max_box_diff_px=float(np.abs(boxes_a - boxes_b).max()),
                   max_score_diff=float(np.abs(scores_a - scores_b).max()))
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# Serving graph split ({doc['device']})", "",
        (f"{doc['at']} · {doc['machine'].get('gpu', 'CPU')} · onnxruntime "
        f"{doc['machine']['onnxruntime']} · frames "
        f"{doc['frame_hw'][1]}×{doc['frame_hw'][0]} from `{doc['video']}` · model input "
        f"{doc['input_hw'][1]}×{doc['input_hw'][0]} · {doc['seconds']} s timed per row · "
        f"`{doc['command']}`"), "",
        *_budget(doc),
        ("Each row is a model of its own, inputs bound on the device and outputs left there. "
        "`pre + network + post` against `serving` says what composing them costs or saves."),
        "",
        "| precision | batch | row | frames/s | ms per batch (P50) | P95 | share of `serving` |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        whole = next((x["p50_ms"] for x in doc["rows"] if x["precision"] == r["precision"]
                      and x["batch"] == r["batch"] and x["engine"] == "serving"), None)
        share = f"{100 * r['p50_ms'] / whole:.0f} %" if whole else ""
        lines.append(f"| {r['precision']} | {r['batch']} | `{r['engine']}` | "
                     f"{r['frames_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{share} |")
    lines += ["", "## Candidates against what ships", ""]
    for key, value in doc["checks"].items():
        lines.append(f"- `{key}`: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _budget(doc: dict[str, Any]) -> list[str]:
    """The rows' host CPU budget and the load average, where the report has them."""
    lines = []
    if doc.get("threads") is not None:
        lines.append(f"Host CPU threads of every row: ONNX Runtime intra-op {doc['threads']} "
                     f"(inter-op 1); {doc['machine'].get('cpu_count')} CPUs.")
    if doc.get("load_average_start_end"):
        start, end = (" / ".join(f"{v:.2f}" for v in x) for x in doc["load_average_start_end"])
        lines.append(f"Load average (1/5/15 min) at start {start}, at end {end}.")
    return [" ".join(lines), ""] if lines else []


def run(args: argparse.Namespace) -> dict[str, Any]:
    detector = onnx.load(str(args.onnx))
    in_dims = dims(detector.graph.input[0])
    out_dims = dims(detector.graph.output[0])
    input_hw, nc, anchors = (int(in_dims[2]), int(in_dims[3])), int(out_dims[1]) - 4, \
        int(out_dims[2])
    load_start = list(os.getloadavg())
    threads = getattr(args, "threads", DEFAULT_THREADS)
    frames = np.stack(load_frames(args.video, max(args.batches)))
    frame_hw = (int(frames.shape[1]), int(frames.shape[2]))
    suffix = "" if args.device == "cuda" else "_cpu"
    doc: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"), "device": args.device,
        "machine": _machine(args.device), "video": args.video.name,
        "frame_hw": list(frame_hw), "input_hw": list(input_hw), "seconds": args.seconds,
        "command": args.command, "threads": threads, "ort_intra_op_threads": threads,
        "ort_inter_op_threads": 1,
        # [start, latest]: the end is updated at every save, so a run cut short has one too
        "load_average_start_end": [load_start, load_start], "rows": [], "checks": {},
    }
    out_json = args.out / f"gpu_graph_split{suffix}.json"
    out_md = args.out / f"gpu_graph_split{suffix}.md"

    def save() -> None:
        doc["load_average_start_end"][1] = list(os.getloadavg())
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_json, json.dumps(doc, indent=1))
        write_text_atomic(out_md, markdown(doc))

    pre = letterbox.preprocess_model(frame_hw, input_hw, "B", detector)
    u8_pre = letterbox.preprocess_model(frame_hw, input_hw, "B", detector, resize="uint8_first")
    separable_pre = letterbox.preprocess_model(frame_hw, input_hw, "B", detector,
                                               resize="separable")
    post = post_model(frame_hw, input_hw, nc, anchors, detector)  # fp32 in both precisions
    for precision in args.precisions:
        net_model = serving_graph.to_fp16(detector) if precision == "fp16" else detector
        serving_path = args.work / f"serving_{precision}.onnx"
        serving_graph.build_serving_graph(args.onnx, serving_path, frame_hw=frame_hw,
                                          precision=precision)
        cand_path = args.work / f"serving_{precision}_cand1024.onnx"
        serving_graph.build_serving_graph(args.onnx, cand_path, frame_hw=frame_hw,
                                          precision=precision, max_candidates=1024)
        separable_path = args.work / f"serving_{precision}_separable.onnx"
        serving_graph.build_serving_graph(args.onnx, separable_path, frame_hw=frame_hw,
                                          precision=precision, resize="separable")
        runners: dict[str, Runner] = {
            "network": Runner("network", net_model, args.device, threads),
            "pre": Runner("pre", pre, args.device, threads),
            "post": Runner("post", post, args.device, threads),
            "serving": Runner("serving", serving_path, args.device, threads),
            "pre_resize_u8": Runner("pre_resize_u8", u8_pre, args.device, threads),
            "pre_separable": Runner("pre_separable", separable_pre, args.device, threads),
            "post_cand_1024": Runner("post_cand_1024", post_model(
                frame_hw, input_hw, nc, anchors, detector, max_candidates=1024), args.device,
                threads),
            "post_chunk_1": Runner("post_chunk_1", post_model(
                frame_hw, input_hw, nc, anchors, detector, chunk=1), args.device, threads),
            "post_chunk_16": Runner("post_chunk_16", post_model(
                frame_hw, input_hw, nc, anchors, detector, chunk=16), args.device, threads),
            "post_chunk_32_cand_1024": Runner("post_chunk_32_cand_1024", post_model(
                frame_hw, input_hw, nc, anchors, detector, chunk=32, max_candidates=1024),
                args.device, threads),
            "serving_cand_1024": Runner("serving_cand_1024", cand_path, args.device, threads),
            "serving_separable": Runner("serving_separable", separable_path, args.device, threads),
        }
        if precision == args.precisions[0]:  # pre and post are fp32 in both precisions
            cuts = [("pre", pre, letterbox.PRE_PREFIX, _pre_step),
                    ("pre_separable", separable_pre, letterbox.PRE_PREFIX, _pre_step),
                    ("post", post, nms.POST_PREFIX, _post_step)]
            for row, model, prefix, keep in cuts:
                for step, cut in cut_steps(model, prefix, keep):
                    name = f"{row}_upto_{step}"
                    runners[name] = Runner(name, cut, args.device, threads)
        for batch in args.batches:
            x = np.ascontiguousarray(frames[:batch])
            pixels = runners["pre"].outputs(x)[0]
            raw = runners["network"].outputs(pixels)[0].astype(np.float32)
            # The network takes the letterboxed pixels, every post row the network's raw
            # output, every other row the uint8 frames.
            inputs: dict[str, Callable[[], np.ndarray]] = {"network": lambda p=pixels: p}
            inputs.update({name: lambda r=raw: r for name in runners if name.startswith("post")})
            if batch == max(args.batches):
                shipped = runners["post"].outputs(raw)
                for name in ("pre_resize_u8", "pre_separable"):
                    cand_pixels = runners[name].outputs(x)[0]
                    levels = np.abs(cand_pixels - pixels) * 255.0
                    doc["checks"][f"{name} {precision} b{batch}"] = {
                        "max_levels": float(levels.max()), "mean_levels": float(levels.mean()),
                        "mean_signed_levels": float(((cand_pixels - pixels) * 255.0).mean())}
                for name in ("post_cand_1024", "post_chunk_1", "post_chunk_16",
                             "post_chunk_32_cand_1024"):
                    doc["checks"][f"{name} {precision} b{batch}"] = same_detections(
                        shipped, runners[name].outputs(raw))
                save()
            for name, runner in runners.items():
                if "_upto_" in name and batch != max(args.batches):
                    continue
                row = _row(name, precision, batch,
                           runner.time(inputs.get(name, lambda x=x: x)(), args.seconds))
                doc["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, required=True, help="dynamic-batch detector export")
    ap.add_argument("--video", type=Path, required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help="ONNX Runtime intra-op threads of every row (default %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/roadloop_graph_split"))
    args = ap.parse_args(argv)
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.device == "cpu" and "fp16" in args.precisions:
        ap.error("fp16 runs on cuda only (ONNX Runtime's CPU has few fp16 kernels)")
    if args.threads < 1:
        ap.error("--threads must be >= 1 (every row gets the same budget)")
    args.work.mkdir(parents=True, exist_ok=True)
    args.command = "python -m benchmarks.gpu_graph_split " + " ".join(argv)
    if hasattr(ort, "preload_dlls") and args.device == "cuda":
        ort.preload_dlls()
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
