#!/usr/bin/env bash
# GPU readiness in one command, under 8 minutes on one GPU: every Lightning trainer's smoke run on the GPU in
# bf16-mixed and 16-mixed with channels_last weights (and its training images/s), the Detectron2 and MMDetection
# smoke configs on cuda, and tools/benchmark.py --device cuda (SE overhead, ours vs timm / torchvision, bf16,
# channels_last, eager and torch.compile). Writes OUT/gpu_check.json and OUT/gpu_check.png (tools/gpu_check.py).
#
#   tools/gpu_check.sh OUT [--budget SECONDS] [--only cifar,benchmark,...]
#   PYTHON=/path/to/env/bin/python tools/gpu_check.sh OUT      # another environment than the checkout's
#
# Exit status: 0 every step ok; 1 a step failed, timed out or did not fit the budget (the JSON says which);
# 2 usage, or no GPU (checked first, in seconds).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "usage: tools/gpu_check.sh OUT [--budget SECONDS] [--only NAME,...]" >&2
    exit 2
fi
if [ -n "${PYTHON:-}" ]; then
    python=("$PYTHON")
elif [ -x "$repo/.venv/bin/python" ]; then
    python=("$repo/.venv/bin/python")
else
    python=(uv run --project "$repo" --extra mmdet python)
fi
# before anything slow: without a GPU every step would fail, minutes later
if ! "${python[@]}" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    smi="no nvidia-smi on PATH"
    command -v nvidia-smi >/dev/null && smi="nvidia-smi -L: $(nvidia-smi -L 2>&1 | head -n 1)"
    echo "error: no CUDA GPU is visible to torch (torch.cuda.is_available() is False; $smi);" \
        "tools/gpu_check.sh checks a GPU machine" >&2
    exit 2
fi
exec "${python[@]}" "$repo/tools/gpu_check.py" "$@"
