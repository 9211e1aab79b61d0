#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: segmap's fidelity tests with segmap on CUDA (exact fp32 and fast fp16 against
# nnUNetPredictor), then the realistic-size and medium scenarios side by side on the GPU, mirroring off and on.
# Prints the figures; exits non-zero when a fidelity check fails. TILES=2 (default: the full 512x512x300 series,
# 64 tiles) shrinks the realistic scenario for a quick look. Usage: bench/gpu_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PY:-.venv/bin/python}}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch %s built for CUDA %s)" % (torch.__version__, torch.version.cuda))
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name(0))
PY

echo "== fidelity on CUDA (segmap exact fp32 and fast fp16 vs nnUNetPredictor on the CPU)"
SEGMAP_TEST_DEVICE=cuda "$PY" -m pytest -q -s tests/test_fidelity.py 2>&1 \
    | grep -E "^fidelity|voxels per label|passed|failed|Error" 

echo "== realistic-size scenario on CUDA${TILES:+ ($TILES tiles per axis)}"
"$PY" bench/bench_engine.py --scenario realistic --device cuda --precision exact,fast --mirroring both \
    ${TILES:+--tiles "$TILES"} --json "${OUT:-/tmp}/gpu_realistic.json"

echo "== medium scenario on CUDA"
"$PY" bench/bench_engine.py --scenario medium-net --device cuda --precision exact,fast --mirroring both \
    --json "${OUT:-/tmp}/gpu_medium.json"
