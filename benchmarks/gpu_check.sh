#!/usr/bin/env bash
# The GPU measurements of issues 11 and 14, run once on a lent GPU machine (the `device` tool; see
# the README's GPU paragraphs for the results).  The machine has its own torch and no network, so the
# pure-Python packages memloc needs beyond its image travel as wheels in .whl/ (not committed).
# Writes JSON results under $OUT (default ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MEMLOC_PROGRESS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, transformer_lens; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
echo "== tests/test_placement.py (the all-GPU map test runs here)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_placement.py 2>&1 | tail -5
echo "== placement: all-GPU device_map, GPU + CPU offload map"
timeout 100 python3 -m benchmarks.placement --map cuda,cuda-cpu --json "$OUT/placement_cuda.json" 2>&1 | tail -20
echo "== perf (full), float32 + bfloat16"
timeout "${FULL_S:-250}" python3 -m memloc -q perf --device cuda --dtype float32,bfloat16 --json "$OUT/perf_cuda_full.json" 2>&1 | tail -40
echo "== perf --quick, float32 + bfloat16"
timeout "${QUICK_S:-120}" python3 -m memloc -q perf --quick --device cuda --dtype float32,bfloat16 --json "$OUT/perf_cuda_quick.json" 2>&1 | tail -40
echo "== done"
