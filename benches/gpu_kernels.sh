#!/usr/bin/env bash
# Kernel correctness and benchmarks on a GPU, every result written into the directory given:
#   bash benches/gpu_kernels.sh OUT_DIR          (DEVICE=cpu for a dry run on the CPU)
# Runs on a bare GPU machine with torch + triton installed and this checkout (pip install -e . --no-deps
# if fastmt is not installed). A liger_kernel wheel in ./carry/ is installed for the `liger` provider.
set -uo pipefail
device=${DEVICE:-cuda}   # DEVICE=cpu runs the same steps through the Triton interpreter (a dry run)
out=${1:?usage: bash benches/gpu_kernels.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python -c "import fastmt" 2>/dev/null || pip install -q -e . --no-deps --no-build-isolation
ls carry/liger_kernel-*.whl >/dev/null 2>&1 && pip install -q --no-deps carry/liger_kernel-*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
status=0
timeout 240 python -m fastmt check --device "$device" --json "$out/check.json" > "$out/check.txt" 2>&1 || status=1
tail -n 40 "$out/check.txt"
timeout 300 python benches/bench_kernels.py --device "$device" --out "$out/kernels.jsonl" > "$out/bench_kernels.txt" 2>&1 || status=1
tail -n 30 "$out/bench_kernels.txt"
python benches/plot_kernels.py --rows "$out/kernels.jsonl" --out "$out/kernels.png" || status=1
exit $status
