#!/usr/bin/env bash
# The GPU evidence in one short window, from a plain checkout (nothing installed, no pip):
#   bash benches/gpu_suite.sh OUT_DIR
# Needs python with torch, triton and transformers. pytest (the tests stage) and matplotlib (the
# charts) are used where installed; without them the suite says what it skipped and goes on, and a
# skipped part is not a failure. Stages, in priority order; each has its own time limit, writes as it
# goes, and runs even when an earlier one failed:
#   tests   the CUDA tests of the files in CUDA_TESTS (default tests/test_tasks_classification_step.py: training under
#           CUDA graphs), then the kernel tests on the GPU (FASTMT_TEST_DEVICE=cuda tests/test_kernels_api.py,
#           in parallel workers where pytest-xdist is installed)
#   check   fastmt check --device cuda: every kernel case against float64           -> check.json
#   kbench  benches/bench_kernels.py: target shapes, bf16, fwd+bwd (then fwd alone)  -> kernels.jsonl, kernels.png
#   lm      benches/bench_lm.py: the causal-LM loss, fused vs Liger (once per teacher) vs torch.compile vs
#           eager vs the vocabulary-tiled Triton kernels, 8,192 tokens, D=4,096, 2 teachers, bf16,
#           V=128,256 then 32,000                                                    -> lm.jsonl
#   bench   fastmt bench --preset base: reference, eager-fp16, fast, then the rest    -> bench-PRESET-GPU.json
#   memory  fastmt memory --preset base (no allocator snapshot)                      -> memory.json, memory.png
# Time: within BUDGET_S seconds in all (default 525: under 9 minutes on one H100). Each stage is
# guaranteed its share; what a stage leaves unused goes to the stages after it, up to each one's cap.
# Files: at most 8, all directly in OUT_DIR: suite.log (everything printed, and a per-stage timing
# summary at the end) and the results above; none over 16 MiB.
# Exit status 0 when every stage passed (or was skipped for a missing package), 1 when any failed or
# ran out of time.
# Dry run on the CPU (tiny preset, Triton interpreter, a few tests; about three minutes on 2 cores):
#   DEVICE=cpu PRESET=tiny bash benches/gpu_suite.sh /tmp/suite-dry
# Other settings: STAGES (a subset, in order, e.g. "check tests kbench"), BUDGET_S, BENCH_MODES (the
# first bench run), BENCH_MORE (the second), CUDA_TESTS (test files whose CUDA tests run).
set -uo pipefail
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
t0=$(now_ms)
elapsed() { echo $(( ($(now_ms) - t0) / 1000 )); }

if [ $# -ne 1 ]; then
    echo "usage: bash benches/gpu_suite.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2

device=${DEVICE:-cuda}
preset=${PRESET:-base}
budget=${BUDGET_S:-525}
[ "$device" = cpu ] && budget=${BUDGET_S:-900}  # the window is the GPU's; a dry run may take its time
cuda_tests=${CUDA_TESTS:-tests/test_tasks_classification_step.py}

# The checkout itself is the package: fastmt/ from the root, fastmt.kernels from kernels/.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# A Liger-Kernel wheel dropped into carry/ serves as the kernel benchmark's `liger` provider: it is
# pure Python, unpacked next to it (its namespace packages cannot be imported from the zip itself),
# since nothing is installed here.
for whl in carry/liger_kernel-*.whl; do
    if [ -f "$whl" ]; then
        dir="$root/carry/$(basename "$whl" .whl)"
        [ -d "$dir" ] || python -m zipfile -e "$whl" "$dir"
        PYTHONPATH="$PYTHONPATH:$dir"
    fi
done
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
if [ "$device" = cpu ]; then
    export TRITON_INTERPRET=1 FASTMT_TEST_DEVICE=cpu
else
    unset TRITON_INTERPRET  # compiled kernels, not the interpreter
    export FASTMT_TEST_DEVICE=cuda
fi

if command -v nvidia-smi >/dev/null 2>&1 && [ "$device" != cpu ]; then
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | awk '{print tolower($2)}')
fi
gpu=${gpu:-$device}
bench_json=$out/bench-$preset-$gpu.json
# A rerun into the same dir starts clean (bench_kernels appends to its JSONL).
rm -f "$out"/suite.log "$out"/check.json "$out"/kernels.jsonl "$out"/kernels.png "$bench_json" \
    "$out"/memory.json "$out"/memory.png "$out"/snapshot-fast.pickle "$out"/.bench-rest.json "$out"/lm.jsonl
exec > >(tee -a "$out/suite.log") 2>&1
tee_pid=$!

# Seconds each stage is guaranteed, and the most it may take; the guarantees add up to the default budget.
declare -A share=([check]=60 [tests]=160 [kbench]=65 [lm]=60 [bench]=120 [memory]=60)
declare -A cap=([check]=90 [tests]=240 [kbench]=100 [lm]=150 [bench]=300 [memory]=90)
read -r -a stages <<< "${STAGES:-tests check kbench lm bench memory}"
for name in "${stages[@]}"; do
    if [ -z "${share[$name]:-}" ]; then
        echo "gpu_suite: STAGES: unknown stage '$name' (choose from tests check kbench lm bench memory)" >&2
        exit 2
    fi
done
declare -A status secs limit
failed=0
stage_end=0
SKIP=125  # a stage's status when a package it needs is not installed (not a failure)
skipped=()

# have MODULE: whether python imports it here.
have() { python -c "import $1" >/dev/null 2>&1; }

# within RESERVE CMD...: CMD under the stage's time left, less RESERVE seconds kept for what follows.
# SIGINT first: pytest and fastmt then print what they have and close their files.
within() {
    local reserve=$1
    shift
    local left=$(( stage_end - $(elapsed) - reserve ))
    if [ "$left" -lt 5 ]; then
        echo "[suite] no time left for: $*"
        return 124
    fi
    timeout --signal=INT --kill-after=5 "$left" "$@"
}

# keep STATUS: a stage reports its first failure (124: a time limit); the caller's `rc` holds it.
keep() {
    if [ "$1" -ne 0 ] && [ "$rc" -eq 0 ]; then rc=$1; fi
    return 0
}

stage_check() {
    local quick=()
    [ "$device" = cpu ] && quick=(--quick)
    within 0 python -m fastmt check --device "$device" "${quick[@]}" --json "$out/check.json"
}

stage_tests() {
    if ! have pytest; then
        echo "[suite] tests: skipped, pytest is not installed"
        skipped+=("tests (no pytest)")
        return $SKIP
    fi
    local rc=0 sel=(-k "not fastmt_check_passes")  # the check stage runs fastmt check itself
    if [ "$device" = cpu ]; then
        sel=(-k "(float32 and (3x7x5 or 2x2x3x5x12x20)) or ignored_rows or minus_inf")
    fi
    # The CUDA-graph training tests first (nothing else runs them); the kernel tests get what is left
    # (at least 60 s), and the check stage after them compares every kernel with float64 again.
    local f
    for f in $cuda_tests; do
        if [ ! -f "$f" ]; then
            echo "[suite] $f: not in this checkout, skipped"
            continue
        fi
        # Only the GPU tests of these files: their CPU tests are CI's.
        within 60 python -m pytest -p no:cacheprovider --disable-warnings -v -rfEs "$f" -k cuda
        keep $?
    done
    # The kernel tests are mostly Triton compiling each specialization: with pytest-xdist, in parallel
    # workers (one CUDA context each; the compiled kernels land in Triton's cache, where the check
    # stage finds them).
    local par=()
    if [ "$device" != cpu ] && have xdist; then
        local n
        n=$(nproc 2>/dev/null || echo 2)
        [ "$n" -gt 12 ] && n=12
        [ "$n" -gt 1 ] && par=(-n "$n")
    fi
    within 0 python -m pytest -p no:cacheprovider --disable-warnings -v -rfEs "${par[@]}" tests/test_kernels_api.py \
        tests/test_kernels_lm.py "${sel[@]}"
    keep $?
    return $rc
}

stage_kbench() {
    local args=(--dtypes bf16 --providers fused,eager,compiled,liger)
    [ "$device" = cpu ] && args=(--providers fused,eager)
    local rc=0
    within 10 python benches/bench_kernels.py --device "$device" --out "$out/kernels.jsonl" --modes full "${args[@]}"
    keep $?
    if [ "$device" != cpu ] && [ $(( stage_end - $(elapsed) )) -gt 30 ]; then
        # Forward alone, while time is left; rows are appended as they are measured.
        within 10 python benches/bench_kernels.py --device "$device" --out "$out/kernels.jsonl" --modes fwd "${args[@]}" \
            || echo "[suite] kbench: forward rows cut short (not a failure)"
    fi
    if [ -s "$out/kernels.jsonl" ]; then
        if have matplotlib; then
            within 0 python benches/plot_kernels.py --rows "$out/kernels.jsonl" --out "$out/kernels.png"
            keep $?
        else
            echo "[suite] kbench: no chart, matplotlib is not installed (the rows are in kernels.jsonl)"
            skipped+=("kbench chart (no matplotlib)")
        fi
    fi
    return $rc
}

stage_lm() {
    local args=(--device "$device" --tokens 8192 --dim 4096 --teachers 2 --vocab 128256,32000
                --providers "${LM_PROVIDERS:-fused,liger,compiled,eager,triton-tiles}")
    # The dry run: the interpreter's fused kernel at a size it finishes, the same providers.
    [ "$device" = cpu ] && args=(--device cpu --tokens 64 --dim 32 --teachers 2 --vocab 1000 --reps 2
                                 --providers fused,triton-tiles,eager)
    local rc=0
    within 0 python benches/bench_lm.py "${args[@]}" --out "$out/lm.jsonl"
    keep $?
    if [ "$device" != cpu ] && [ $(( stage_end - $(elapsed) )) -gt 40 ]; then
        # Where the fused pass's time goes at the largest vocabulary: its top kernels under the profiler.
        within 0 python benches/bench_lm.py --device "$device" --tokens 8192 --dim 4096 --teachers 2 --vocab 128256 \
            --providers fused --warmup 1 --reps 1 --profile || echo "[suite] lm: the profile was cut short (not a failure)"
    fi
    return $rc
}

stage_bench() {
    local first rest steps=()
    if [ "$device" = cpu ]; then
        first=${BENCH_MODES:-reference}; rest=${BENCH_MORE:-bf16}; steps=(--steps 2 --rounds 1)
    else
        first=${BENCH_MODES:-reference,eager-fp16,fast}; rest=${BENCH_MORE:-fused,stacked,fused+compile,fast-bf16}
    fi
    local rc=0
    # Two runs: a crash in one mode (fast, say) must not cost the rest of the ladder. Each run
    # rewrites its JSON after every mode; the second's modes are then appended to the first's file.
    within 0 python -m fastmt bench --device "$device" --preset "$preset" --modes "$first" "${steps[@]}" \
        --json "$bench_json"
    keep $?
    if [ -n "$rest" ]; then
        within 0 python -m fastmt bench --device "$device" --preset "$preset" --modes "$rest" "${steps[@]}" \
            --json "$out/.bench-rest.json"
        local rc2=$?
        if [ $rc2 -eq 124 ]; then
            echo "[suite] bench: the rest of the ladder was cut at the time limit (not a failure)"
        else
            keep $rc2
        fi
        python - "$bench_json" "$out/.bench-rest.json" <<'EOF'
import json, os, sys
main, rest = sys.argv[1:3]
if os.path.exists(rest):
    more = json.load(open(rest))
    if os.path.exists(main):
        result = json.load(open(main))
        result["modes"] += more["modes"]
        result["complete"] = bool(result.get("complete")) and bool(more.get("complete"))
    else:
        result = more
    with open(main + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(main + ".tmp", main)
    os.remove(rest)
    print(f"[suite] {main}: modes {', '.join(m['name'] for m in result['modes'])}")
EOF
        keep $?
    fi
    return $rc
}

stage_memory() {
    have matplotlib || skipped+=("memory chart (no matplotlib)")
    # No allocator snapshot: the files that come back from a GPU lease are 8 at most, and lm.jsonl is one.
    within 0 python -m fastmt memory --device "$device" --preset "$preset" --out "$out" --snapshot-mb 0
}

echo "[suite] $(date -u '+%Y-%m-%d %H:%M:%S UTC') device=$device preset=$preset budget=${budget}s out=$out"
echo "[suite] checkout $root ($(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
if [ "$device" != cpu ]; then
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
timeout 60 python -c "import sys, torch, triton, transformers, fastmt; print('[suite] python', sys.version.split()[0], \
'| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, \
'| fastmt from', fastmt.__file__)" || true

n=${#stages[@]}
for ((i = 0; i < n; i++)); do
    name=${stages[$i]}
    reserved=0
    for ((j = i + 1; j < n; j++)); do
        reserved=$(( reserved + ${share[${stages[$j]}]} ))
    done
    allowed=$(( budget - $(elapsed) - reserved ))
    [ "$allowed" -gt "${cap[$name]}" ] && allowed=${cap[$name]}
    limit[$name]=$allowed
    start=$(now_ms)
    if [ "$allowed" -lt 10 ]; then
        echo "[suite] ==== $name: skipped, ${allowed}s left for it"
        status[$name]="SKIPPED (no time)"
        secs[$name]=0
        failed=1
        continue
    fi
    echo "[suite] ==== $name (up to ${allowed}s; at $(elapsed)s of ${budget}s)"
    stage_end=$(( $(elapsed) + allowed ))
    "stage_$name"
    rc=$?
    ms=$(( $(now_ms) - start ))
    secs[$name]=$(printf '%d.%d' $(( ms / 1000 )) $(( ms % 1000 / 100 )))
    if [ $rc -eq 0 ]; then
        status[$name]=ok
    elif [ $rc -eq $SKIP ]; then
        status[$name]="SKIPPED (not installed)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status[$name]="TIME LIMIT"
        failed=1
    else
        status[$name]="FAILED (exit $rc)"
        failed=1
    fi
    echo "[suite] ==== $name: ${status[$name]} in ${secs[$name]}s"
done

# A stage killed in the middle of an atomic write leaves its temporary file: not a result.
find "$out" -maxdepth 1 -name '.*.tmp' -type f -delete 2>/dev/null

echo
echo "gpu_suite: $device, preset $preset, $(elapsed)s of ${budget}s"
printf '  %-8s %-20s %9s %9s\n' stage status seconds limit
for name in "${stages[@]}"; do
    printf '  %-8s %-20s %9s %9s\n' "$name" "${status[$name]:-not run}" "${secs[$name]:-0}" "${limit[$name]:-0}"
done
if [ ${#skipped[@]} -gt 0 ]; then
    echo "skipped (not installed here): $(IFS=,; echo "${skipped[*]}" | sed 's/,/, /g')"
fi
echo "files in $out:"
(cd "$out" && find . -type f -printf '  %P  %s bytes\n' | sort)
files=$(find "$out" -type f | wc -l)
deep=$(find "$out" -mindepth 3 -type f | wc -l)
big=$(find "$out" -type f -size +16M | wc -l)
if [ "$files" -gt 8 ] || [ "$deep" -gt 0 ] || [ "$big" -gt 0 ]; then
    echo "gpu_suite: WARNING: $files files, $deep more than two folders down, $big over 16 MiB"
fi
if [ $failed -ne 0 ]; then
    verdict="some stage failed"
elif [ ${#skipped[@]} -gt 0 ]; then
    verdict="every stage that could run here passed"
else
    verdict="every stage passed"
fi
echo "gpu_suite: $verdict, results in $out"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null
exit $failed
