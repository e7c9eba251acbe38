#!/usr/bin/env bash
# The kernel part of the GPU suite alone: fastmt check, the kernel tests on the GPU and the kernel
# benchmarks, from a plain checkout (no install), every result in OUT_DIR:
#   bash benches/gpu_kernels.sh OUT_DIR          (DEVICE=cpu for a dry run in Triton's interpreter)
# Same stages, limits and files as benches/gpu_suite.sh, which runs these first.
STAGES="check tests kbench" exec bash "$(dirname "$0")/gpu_suite.sh" "$@"
