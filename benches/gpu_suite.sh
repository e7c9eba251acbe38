#!/usr/bin/env bash
# The whole GPU evidence in one command, every result written into OUT_DIR:
#   bash benches/gpu_suite.sh OUT_DIR
# fastmt check + kernel benchmarks (benches/gpu_kernels.sh), fastmt bench --preset base, fastmt memory.
# Budget: under 8 minutes on one H100 (torch 2.11, triton 3.6, no internet); each part has its own timeout.
# Dry run on the CPU (tiny preset, Triton interpreter):  DEVICE=cpu PRESET=tiny bash benches/gpu_suite.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash benches/gpu_suite.sh OUT_DIR}
device=${DEVICE:-cuda}
preset=${PRESET:-base}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python -c "import fastmt" 2>/dev/null || pip install -q -e . --no-deps --no-build-isolation
status=0
DEVICE=$device bash benches/gpu_kernels.sh "$out" || status=1
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
timeout 300 python -m fastmt bench --device "$device" --preset "$preset" --json "$out/bench-$preset-$gpu.json" \
    > "$out/bench-$preset.txt" 2>&1 || status=1
tail -n 12 "$out/bench-$preset.txt"
timeout 120 python -m fastmt memory --device "$device" --preset "$preset" --out "$out/memory" \
    > "$out/memory.txt" 2>&1 || status=1
tail -n 12 "$out/memory.txt"
echo "gpu_suite: status $status, results in $out"
exit $status
