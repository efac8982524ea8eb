"""A/B on the GPU box: the serving graph with per-(image, class) NMS (HEAD, graph_before.py)
against the folded one (working tree), graph alone with frames on the device, same run.
Also checks both give the same detections on real frames."""
import importlib.util, json, os, sys, time
from pathlib import Path
import cv2, numpy as np, onnxruntime as ort

sys.path.insert(0, str(Path.cwd()))
from roadloop.serving.graph import build_serving_graph as build_new  # noqa: E402

spec = importlib.util.spec_from_file_location("graph_before", Path(sys.argv[3]))
before = importlib.util.module_from_spec(spec); sys.modules["graph_before"] = before; spec.loader.exec_module(before)
onnx_path, video, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[4])
cap = cv2.VideoCapture(video); frames = []
while len(frames) < 32:
    ok, f = cap.read()
    if not ok: break
    frames.append(f)
frames = np.stack(frames)
ort.preload_dlls() if hasattr(ort, "preload_dlls") else None
res = {"rows": [], "same": {}}
dev = "cpu" if os.environ.get("AB_CPU") == "1" else "cuda"
prov = ["CPUExecutionProvider"] if dev == "cpu" else ["CUDAExecutionProvider"]
sessions = {}
for name, build in (("before", before.build_serving_graph), ("folded", build_new)):
    g = build(onnx_path, Path(f"/tmp/ab_{name}.onnx"), frame_hw=frames.shape[1:3])
    o = ort.SessionOptions(); o.log_severity_level = 3
    sessions[name] = ort.InferenceSession(str(g.path), o, providers=prov)
outs = {n: s.run(None, {"frames": frames}) for n, s in sessions.items()}
b0, s0, c0, n0 = outs["before"]; b1, s1, c1, n1 = outs["folded"]
res["same"] = {"count_equal": bool((n0 == n1).all()), "counts": n0.tolist()[:8],
               "classes_equal": bool((c0 == c1).all()),
               "max_box_diff_px": float(np.abs(b0 - b1).max()), "max_score_diff": float(np.abs(s0 - s1).max())}
print("same:", res["same"], flush=True)
for b in (1, 8, 32) if dev == "cuda" else (1, 8):
    for name, s in sessions.items():
        io = s.io_binding()
        io.bind_ortvalue_input("frames", ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(frames[:b]), dev, 0))
        for o_ in s.get_outputs(): io.bind_output(o_.name, dev)
        for _ in range(5): s.run_with_iobinding(io)
        lat = []; stop = time.perf_counter() + 2.0
        while time.perf_counter() < stop or len(lat) < 5:
            t0 = time.perf_counter(); s.run_with_iobinding(io); lat.append(time.perf_counter() - t0)
        row = {"graph": name, "batch": b, "frames_per_s": b * len(lat) / sum(lat),
               "p50_ms": float(np.percentile(lat, 50) * 1e3), "p95_ms": float(np.percentile(lat, 95) * 1e3)}
        res["rows"].append(row); print(row, flush=True)
out.write_text(json.dumps(res, indent=1))
