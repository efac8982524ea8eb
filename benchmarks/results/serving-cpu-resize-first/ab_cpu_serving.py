"""CPU A/B, same run: the serving graph with its float resize (shipped default), with
``resize_first=True`` (uint8 resize), and the edge core's ``detect_batch``, all on batches of
8 real 1280x720 frames, the same threads for each (argv[1]), engines in rotating order.

    python benchmarks/results/serving-cpu-resize-first/ab_cpu_serving.py THREADS DETECTOR OUT.json
"""
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edge_agent.inference import OnnxDetector
from roadloop.serving.batched import ServingSession
from roadloop.serving.graph import build_serving_graph

threads, detector, out = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
B, ROUNDS, SECONDS = 8, 6, 1.5
cv2.setNumThreads(threads)
cap = cv2.VideoCapture(str(Path(__file__).parents[3] / ".." / "shared" / "videos"
                           / "highway_overpass.mp4"))
frames = [cap.read()[1] for _ in range(B)]
batch = np.stack(frames)
engines = {}
for name, resize in (("serving_float_resize", "float"), ("serving_uint8_resize", "uint8_first")):
    info = build_serving_graph(detector, Path(f"/tmp/ab_{name}.onnx"), frame_hw=(720, 1280),
                               resize=resize)
    session = ServingSession(info.path, device="cpu", intra_op_threads=threads)
    engines[name] = lambda s=session: s.detect(batch)
edge = OnnxDetector(detector, intra_op_threads=threads)
engines["edge_core"] = lambda: edge.detect_batch(frames)
names = list(engines)
fps = {k: [] for k in names}
load_before = os.getloadavg()
for r in range(ROUNDS):
    for k in names[r % len(names):] + names[: r % len(names)]:
        engines[k]()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < SECONDS:
            engines[k]()
            n += 1
        fps[k].append(B * n / (time.perf_counter() - t0))
doc = {"threads": threads, "batch": B, "detector": detector.name, "frames": "1280x720",
       "load_before": load_before, "load_after": os.getloadavg(),
       "frames_per_s": {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)}
                        for k, v in fps.items()}}
out.write_text(json.dumps(doc, indent=1))
print(json.dumps(doc, indent=1))
