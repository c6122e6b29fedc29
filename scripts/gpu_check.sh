#!/usr/bin/env bash
# Validates a machine with one NVIDIA GPU in minutes (issue 41): the CUDA tests (tests/test_cuda.py),
# then the GPU step-time benchmark (benchmarks/gpu_step.py: dense vs masked vs compact, bf16,
# resnet50 / ViT-B/16 / a GPT-2-small-sized decoder); writes report.md and the raw records to OUTDIR.
#
# Uses what such a machine already has: a python3 with torch >= 2.4, torchvision, timm,
# transformers, pytest and hypothesis (PYTHON=... picks another interpreter). No network, no
# install: fxsparse runs from this checkout on PYTHONPATH. Without a GPU it says so and exits 0.
#
#   bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
out="${1:?usage: bash scripts/gpu_check.sh OUTDIR}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)

if ! versions="$("$python" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")' 2>/dev/null)"; then
    echo "[gpu_check] expected $python to have torch (>= 2.4), timm, transformers, pytest and hypothesis; it has no torch." \
         "Set PYTHON=/path/to/python to use another interpreter." >&2
    exit 2
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    message="no CUDA GPU on this machine ($versions): nothing was run. Run this on a machine with an NVIDIA GPU."
    echo "[gpu_check] $message"
    printf '# GPU check\n\n%s\n' "$message" > "$out/report.md"
    exit 0
fi
device="$("$python" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB")')"
echo "[gpu_check] $device; $versions"

# 1. the CUDA tests (4 minutes at most)
timeout 240 "$python" -m pytest -q -p no:cacheprovider -rs "$root/tests/test_cuda.py" \
    --junitxml="$out/cuda_tests.xml" 2>&1 | tee "$out/cuda_tests.log"
tests=${PIPESTATUS[0]}
# 2. the step-time benchmark (4 minutes at most)
timeout 240 "$python" "$root/benchmarks/gpu_step.py" --out "$out/gpu_step.md" --json "$out/gpu_step.jsonl" \
    2>&1 | tee "$out/gpu_step.log"
bench=${PIPESTATUS[0]}

{
    echo "# GPU check"
    echo
    echo "$device; $versions; $(date -u '+%Y-%m-%d %H:%M UTC'); $(( $(date +%s) - started )) s in all."
    echo "Commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo
    echo "## CUDA tests (tests/test_cuda.py): exit $tests"
    echo
    echo '```'
    tail -n 15 "$out/cuda_tests.log"
    echo '```'
    echo
    echo "## Step time, update cost, peak memory: exit $bench"
    echo
    if [ -f "$out/gpu_step.md" ]; then tail -n +3 "$out/gpu_step.md"; else echo "(no report: see gpu_step.log)"; fi
} > "$out/report.md"
echo "[gpu_check] report: $out/report.md"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
