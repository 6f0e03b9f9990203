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
out=$1
shift
seed=0
if [ $# -gt 0 ] && [[ $1 != -* ]]; then  # SEED is optional: `OUT --quick` is OUT at seed 0
  seed=$1
  shift
fi
exec python examples/shapes_demo.py "$out" --seed "$seed" "$@"
