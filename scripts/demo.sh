#!/usr/bin/env bash
# Sets up .venv (see setup.sh), installs Fashion-MNIST from Debian's package when it is missing,
# and runs the demo: a small CNN trained dense, static-sparse and with RigL at density 0.1 (ERK).
# It writes the run's record to runs/demo/demo.json and, when matplotlib is installed, pictures of
# each sparse run's topology to runs/demo/figures/ (density per layer, churn per update, masks).
# Extra arguments go to recipes/demo.py and win over these (e.g. --epochs 1, --figures DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
data="${FXSPARSE_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
    echo "[demo] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
fi
cd "$root"
exec python recipes/demo.py --out runs/demo/demo.json --figures runs/demo/figures "$@"
