#!/usr/bin/env bash
# The GPU serving figures, on a fresh GPU box with no network (docs/gpu.md has the sequence).
#
#   bash benchmarks/gpu_run.sh stage   keep the carried .gpu_bench/parts/* in $CACHE (the box
#                                      must stay warm between calls: call again within 30 s)
#   bash benchmarks/gpu_run.sh         stage, assemble + install onnxruntime-gpu unless CUDA is
#                                      already there, then benchmark; results into
#                                      benchmarks/results/ and $OUT (if set)
#   bash benchmarks/gpu_run.sh split   the same set-up, then where the serving graph's time goes
#                                      and its candidate changes (benchmarks.gpu_graph_split)
#                                      instead of the serving benchmark
#   bash benchmarks/gpu_run.sh all     the same set-up, then: the serving benchmark as it ships
#                                      (network, graph, direct and batched rows at batch 32, where
#                                      the goal is not met), the split, and the serving benchmark
#                                      again with the options benchmarks.gpu_pick finds paying in
#                                      the split (none: skipped); each run has its own time limit
#                                      (SERVING_TIMEOUT, SPLIT_TIMEOUT)
#
# Budget: the benchmark itself is stopped after BENCH_TIMEOUT s (default 360); the whole script
# stays under 8 minutes. Extra arguments after "run" go to benchmarks.gpu_serving.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE=${CACHE:-/tmp/roadloop_gpu}
STAGE=.gpu_bench
PY=${PYTHON:-python3}
mode=${1:-run}
[ $# -gt 0 ] && shift
mkdir -p "$CACHE/parts"

for part in "$STAGE"/parts/ort.*; do
  [ -f "$part" ] && cp -f "$part" "$CACHE/parts/" && echo "staged $(basename "$part")"
done
have=$(ls "$CACHE/parts" 2>/dev/null | wc -l | tr -d ' ')
echo "parts in $CACHE/parts: $have"
[ "$mode" = stage ] && exit 0

export YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
SITE="$CACHE/site"
if "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
  echo "onnxruntime here already has CUDA"
else
  if [ ! -d "$SITE/onnxruntime" ]; then
    want=$(cat "$STAGE/payload/ort.parts" 2>/dev/null || echo "?")
    if [ "$have" != "$want" ]; then
      echo "ERROR: onnxruntime-gpu needs $want parts, $have are staged (run 'stage' calls first)"
      exit 3
    fi
    name=$(cat "$STAGE/payload/ort.name")
    cat "$CACHE"/parts/ort.* >"$CACHE/$name"
    (cd "$CACHE" && sha256sum -c "$OLDPWD/$STAGE/payload/ort.sha256") || exit 4
    mkdir -p "$SITE"
    case "$name" in
      *.tar.xz) "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
                  "$CACHE/$name" "$SITE" || exit 5
                "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                  --target "$SITE" "$STAGE"/payload/wheels/*.whl || exit 5 ;;
      *) "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
           "$CACHE/$name" "$STAGE"/payload/wheels/*.whl || exit 5 ;;
    esac
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Ultralytics, where the box lacks it (carried in payload/wheels).
"$PY" -c 'import ultralytics' 2>/dev/null || {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
    "$STAGE"/payload/wheels/*.whl && export PYTHONPATH="$PYTHONPATH:$SITE"; }

# CUDA/cuDNN from the nvidia-* wheels beside torch, for onnxruntime's CUDA provider.
NV=$("$PY" -c 'import nvidia, os; print(":".join(sorted({r for p in nvidia.__path__ for r, _, f in os.walk(p) if any(".so" in x for x in f)})))' 2>/dev/null)
[ -n "$NV" ] && export LD_LIBRARY_PATH="$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" - <<'EOF' || exit 6
import onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
print("onnxruntime", ort.__version__, ort.get_available_providers())
assert "CUDAExecutionProvider" in ort.get_available_providers(), "no CUDA execution provider"
EOF

# Which nodes of the serving graph land off the GPU (verbose ORT log, placement lines only).
"$PY" - "$STAGE/payload/detector_640.onnx" "$STAGE/payload/frames.mp4" 2>"$CACHE/placement.log" <<'EOF'
import sys, cv2, numpy as np, onnxruntime as ort
from pathlib import Path
from roadloop.serving.graph import build_serving_graph
ort.preload_dlls() if hasattr(ort, "preload_dlls") else None
cap = cv2.VideoCapture(sys.argv[2]); ok, frame = cap.read()
g = build_serving_graph(Path(sys.argv[1]), Path("/tmp/roadloop_gpu/serve_probe.onnx"), frame_hw=frame.shape[:2])
o = ort.SessionOptions(); o.log_severity_level = 0
s = ort.InferenceSession(str(g.path), o, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("probe run:", [a.shape for a in s.run(None, {"frames": np.stack([frame] * 2)})])
EOF
grep -E "placed on|Node\(s\) placed|All nodes placed" "$CACHE/placement.log" | head -20
grep -A25 "placed on \[CPUExecutionProvider\]" "$CACHE/placement.log" | head -40

run_split() {
  # Sessions log verbosely (ROADLOOP_SPLIT_VERBOSE): which node of each row ran off the GPU.
  ROADLOOP_SPLIT_VERBOSE=1 timeout "$1" "$PY" -m benchmarks.gpu_graph_split \
    --onnx "$STAGE/payload/detector_640.onnx" --video "$STAGE/payload/frames.mp4" \
    --device cuda --precisions fp32,fp16 --batches "${2:-8,32}" --seconds "${BENCH_SECONDS:-2}" \
    2>"$CACHE/split.log"
  local rc=$?
  grep -E "placed on|All nodes placed|^row " "$CACHE/split.log" >"$CACHE/split_placement.log"
  grep -A12 "placed on \[CPUExecutionProvider\]" "$CACHE/split.log" | head -60
  tail -5 "$CACHE/split.log"
  [ -n "${OUT:-}" ] && cp -f benchmarks/results/gpu_graph_split.json \
    benchmarks/results/gpu_graph_split.md "$CACHE/split_placement.log" "$OUT/" 2>/dev/null
  return $rc
}

if [ "$mode" = split ]; then
  run_split "${BENCH_TIMEOUT:-360}"
  exit $?
fi

if [ "$mode" = all ]; then
  # One call for issue 15's open question: the serving path as it ships at batch 32, where the
  # graph's time goes and which candidate pays (split), then the serving path end to end with
  # what benchmarks.gpu_pick picked from the split, if anything paid.
  serve() {  # serve NAME [gpu_serving options...]
    local name=$1; shift
    timeout "${SERVING_TIMEOUT:-150}" "$PY" -m benchmarks.gpu_serving \
      --onnx "$STAGE/payload/detector_640.onnx" --video "$STAGE/payload/frames.mp4" \
      --device cuda --precisions fp32,fp16 --batches 32 \
      --engines network,serving_graph,serving_direct,serving_batched \
      --seconds "${BENCH_SECONDS:-2}" --warmup 1 --name "$name" "$@" 2>&1 \
      | grep -vE "^\|" | tail -12
    [ -n "${OUT:-}" ] && cp -f "benchmarks/results/$name.json" "benchmarks/results/$name.md" \
      "$OUT/" 2>/dev/null
  }
  serve gpu_serving_shipped
  run_split "${SPLIT_TIMEOUT:-200}" 32  # about 50 rows, 3 s each with the sessions' set-up
  picked=$("$PY" -m benchmarks.gpu_pick benchmarks/results/gpu_graph_split.json \
    --why "$CACHE/pick.json")
  [ -n "${OUT:-}" ] && cp -f "$CACHE/pick.json" "$OUT/" 2>/dev/null
  echo "picked from the split: ${picked:-nothing pays}"
  # shellcheck disable=SC2086  # the picked options are separate words
  [ -n "$picked" ] && serve gpu_serving_picked $picked
  exit 0
fi

timeout "${BENCH_TIMEOUT:-360}" "$PY" -m benchmarks.gpu_serving \
  --onnx "$STAGE/payload/detector_640.onnx" --pt "$STAGE/payload/model.pt" \
  --video "$STAGE/payload/frames.mp4" --device cuda --precisions fp32,fp16 --batches 1,8,32 \
  --seconds "${BENCH_SECONDS:-2}" --warmup 1 "$@"
rc=$?
if [ -n "${OUT:-}" ]; then
  cp -f benchmarks/results/gpu_serving.json benchmarks/results/gpu_serving.md "$OUT/" 2>/dev/null
  cp -f "$CACHE/placement.log" "$OUT/" 2>/dev/null
fi
exit $rc
