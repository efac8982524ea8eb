#!/usr/bin/env bash
# Stage, on a machine with registry access, what benchmarks/gpu_run.sh needs on a GPU box that
# reaches nothing (see docs/gpu.md). Writes the git-ignored folder .gpu_bench/:
#   payload/  the 640-px dynamic-batch ONNX export of the gpu checkpoint, the checkpoint itself
#             (for Ultralytics' predict), the 1280x720 highway video, the small wheels
#             (ultralytics, ultralytics-thop) and the onnxruntime-gpu wheel's name and sha256
#   parts/    the onnxruntime-gpu wheel's files as one xz tarball (about 194 MiB against the
#             wheel's 244: the CUDA kernels compress better than the wheel's zip does) cut into
#             four equal parts, since one device call carries at most 64 MiB together with the
#             working tree (about 13 MiB)
# Usage: bash benchmarks/gpu_prepare.sh   (PYTHON=path/to/python, SHARED=../shared to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=../main/.venv/bin/python
SHARED=${SHARED:-../shared}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}   # 1.31.1 is built for CUDA 13, as the GPU box's torch
ULTRA=${ULTRA:-ultralytics==8.4.190}
THOP=${THOP:-ultralytics-thop==2.2.3}
STAGE=.gpu_bench
mkdir -p "$STAGE/payload" "$STAGE/parts" "$STAGE/wheel"

if [ ! -f "$STAGE/payload/detector_640.onnx" ]; then
  PYTHONPATH=. "$PY" - "$SHARED" "$STAGE/payload/detector_640.onnx" <<'EOF'
import sys
from pathlib import Path
from roadloop.models.export import export_onnx
shared, out = Path(sys.argv[1]), Path(sys.argv[2])
print(export_onnx(shared / "models" / "atl_v2_yolo11n_gpu.pt", out, imgsz=640))
EOF
fi
cp -f "$SHARED/models/atl_v2_yolo11n_gpu.pt" "$STAGE/payload/model.pt"
cp -f "$SHARED/videos/highway_overpass.mp4" "$STAGE/payload/frames.mp4"

# Wheels for the GPU box's python (3.12, x86-64 manylinux), without dependencies: it has
# numpy, onnx, opencv, torch and the nvidia-* CUDA 13 libraries already.
dl() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$1" "$2"
}
mkdir -p "$STAGE/payload/wheels"
dl "$STAGE/payload/wheels" "$ULTRA"
dl "$STAGE/payload/wheels" "$THOP"
ls "$STAGE"/wheel/onnxruntime_gpu-*.whl >/dev/null 2>&1 || dl "$STAGE/wheel" "$ORT_GPU"
wheel=$(ls "$STAGE"/wheel/onnxruntime_gpu-*.whl | head -n1)
tarball="$STAGE/wheel/ort.tar.xz"
if [ ! -f "$tarball" ] || [ "$tarball" -ot "$wheel" ]; then
  # The wheel's own files, repacked (a few minutes on two cores: xz -9e).
  rm -rf "$STAGE/wheel/unpacked" && mkdir -p "$STAGE/wheel/unpacked"
  (cd "$STAGE/wheel/unpacked" && unzip -q "$OLDPWD/$wheel" && tar cf - . | xz -T0 -9e >"$OLDPWD/$tarball.tmp")
  mv "$tarball.tmp" "$tarball" && rm -rf "$STAGE/wheel/unpacked"
fi
echo "ort.tar.xz" >"$STAGE/payload/ort.name"
basename "$wheel" >"$STAGE/payload/ort.wheel"
(cd "$STAGE/wheel" && sha256sum ort.tar.xz) >"$STAGE/payload/ort.sha256"
rm -f "$STAGE"/parts/ort.*
split -n "${PARTS:-4}" -d -a 2 "$tarball" "$STAGE/parts/ort."
ls "$STAGE/parts" | wc -l | tr -d ' ' >"$STAGE/payload/ort.parts"
du -sh "$STAGE/payload" "$STAGE"/parts/*
echo "staged; parts: $(cat "$STAGE/payload/ort.parts"). Device calls: see docs/gpu.md"
