#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a fresh GPU machine whose python already holds a CUDA
# build of torch, triton and pytest (nothing is downloaded: the machine needs no network).
#
#   bash benchmarks/gpu.sh [OUT_DIR]              # default OUT_DIR: benchmarks/out
#   SPIDR_REFERENCE=/path/to/spidr-0.2.0-py3-none-any.whl bash benchmarks/gpu.sh OUT_DIR   # + the release row
#   bash benchmarks/gpu.sh --dry-run [OUT_DIR]    # on the CPU: every step but the timings (a check, ~30 s)
#
# Steps:
#   1. install this checkout (pip install --no-build-isolation --no-deps -e .) with SPIDR_BUILD_CUDA=1, which
#      builds spidr._C with its CUDA kernels;
#   2. the GPU tests (pytest -m gpu)                                   -> OUT_DIR/gpu_tests.log
#   3. bench_ops on cuda: torch, release, cuda, triton and floor rows  -> OUT_DIR/ops.{md,json}
#   4. bench_step: the base SpidR training step with torch.compile, bf16 autocast, at 3.8 M samples per GPU:
#      19 utterances of 200000 samples (12.5 s). The training sampler fills a batch with files of nearly the
#      same length up to 3.8 M samples and crops them to the shortest, capped at 320000 samples (20 s); 12.5 s
#      is about LibriSpeech 960 h's mean utterance, and 19 x 200000 is exactly 3.8 M. Rows: ours (default ops
#      backend), ours-torch, and release when SPIDR_REFERENCE is set    -> OUT_DIR/step.{md,json}
#   5. project_400k with the measured step time of `ours`: FLOPs, the paper's MFU and the projected hours for
#      400k steps on 16 GPUs                                            -> OUT_DIR/project_400k.{md,json}
#   OUT_DIR/gpu.md gathers the machine and every Markdown table.
#
# --dry-run runs on the CPU and checks every step but the timings: step 1 is skipped when spidr is already
# importable (a CPU-only editable install otherwise, SPIDR_BUILD_CUDA=0), step 2 only collects the GPU tests,
# steps 3-5 run in --quick mode (tiny shapes and model, one repeat, eager), and the same files are written.
# The exit status is non-zero when a step failed; the later steps still run.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
    shift
elif [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
fi
out=${1:-benchmarks/out}
mkdir -p "$out"
python=${PYTHON:-python3}
status=0

step() { echo; echo "== $*"; }
fail() { echo "!! $* failed" >&2; status=1; }

if (( dry )); then
    device=cpu
    quick=(--quick --repeats 1)
    step_args=(--device cpu --quick --repeats 1)
    banner="DRY RUN on the CPU (--quick shapes, 1 repeat): these tables check the code path, they are not figures."
else
    device=cuda
    quick=(--repeats 5)
    step_args=(--device cuda --compile --batch 19 --utterance-samples 200000 --repeats 5)
    banner="GPU run: bf16 autocast, torch.compile, 3.8 M samples per step (19 x 200000)."
fi

step "machine"
{
    echo "# spidr GPU benchmarks, $(date -u +%Y-%m-%d)"
    echo
    echo "$banner"
    echo
    if (( ! dry )); then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
    fi
    "$python" -c "import sys; sys.path.insert(0, '.'); from benchmarks.harness import machine_line; print('Machine:', machine_line())"
    "$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
} | tee "$out/gpu.md" || fail "machine description"
if (( ! dry )); then
    "$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: use --dry-run on a CPU machine'" \
        || exit 1
fi

step "install this checkout"
if (( dry )); then
    if where=$("$python" -c "import spidr, os; print(os.path.dirname(spidr.__file__))" 2>/dev/null); then
        echo "dry run: spidr is already importable (from $where): pip install skipped"
    else
        echo "dry run: spidr is not importable: CPU-only editable install (SPIDR_BUILD_CUDA=0)"
        SPIDR_BUILD_CUDA=0 "$python" -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -n 20 \
            || fail "pip install"
    fi
else
    SPIDR_BUILD_CUDA=1 "$python" -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -n 20 \
        || fail "pip install"
fi
"$python" -c "import spidr, spidr.ops as ops; print(spidr.build_info()); print('$device backends:', ops.backends('$device'))" \
    || fail "import spidr"

step "GPU tests"
if (( dry )); then
    "$python" -m pytest -q -m gpu --collect-only tests/ > "$out/gpu_tests.log" 2>&1 || fail "pytest --collect-only"
else
    "$python" -m pytest -q -m gpu tests/ > "$out/gpu_tests.log" 2>&1 || fail "GPU tests"
fi
tail -n 5 "$out/gpu_tests.log"

step "ops benchmark"
"$python" benchmarks/bench_ops.py --device "$device" "${quick[@]}" --json "$out/ops.json" | tee "$out/ops.md" \
    || fail "bench_ops"

step "training step benchmark"
"$python" benchmarks/bench_step.py "${step_args[@]}" --json "$out/step.json" | tee "$out/step.md" \
    || fail "bench_step"

step "projection to 400k steps"
project=(--gpus 16 --json "$out/project_400k.json")
if [[ -s "$out/step.json" ]]; then
    project+=(--from-step-json "$out/step.json")
    (( dry )) || project+=(--peak-tflops auto)
fi
"$python" benchmarks/project_400k.py "${project[@]}" | tee "$out/project_400k.md" || fail "project_400k"

for part in gpu_tests.log ops.md step.md project_400k.md; do
    if [[ "$part" == gpu_tests.log ]]; then
        printf '\n## GPU tests\n\n```\n%s\n```\n' "$(tail -n 5 "$out/$part" 2>/dev/null)"
    else
        printf '\n## %s\n\n' "${part%.md}"
        sed '1{/GPU:/d}' "$out/$part" 2>/dev/null
    fi
done >> "$out/gpu.md"

step "done"
echo "Outputs in $out: gpu.md, gpu_tests.log, ops.{md,json}, step.{md,json}, project_400k.{md,json}"
(( status == 0 )) || echo "!! some steps failed: see above" >&2
exit $status
