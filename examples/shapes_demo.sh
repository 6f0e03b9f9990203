#!/usr/bin/env bash
# See it learn: pretrain a small shapes-world model, run self-play and its controls, evaluate them.
#   bash examples/shapes_demo.sh OUT [SEED] [--quick]
# Everything is in examples/shapes_demo.py; this wrapper runs it from the repo's root with its venv.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash examples/shapes_demo.sh OUT [SEED] [--quick]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
exec python examples/shapes_demo.py "$1" --seed "${2:-0}" "${@:3}"
