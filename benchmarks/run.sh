#!/usr/bin/env bash
# The one command: sets up .venv-bench (once) and runs the AdamW benchmark.
#
#   bash benchmarks/run.sh                       # full run, ~5.5 min on 2 cores
#   bash benchmarks/run.sh --quick               # smoke run, into
#                                                # benchmarks/results/quick/
#   bash benchmarks/run.sh --layouts B --rounds 3 --steps 10
#   bash benchmarks/run.sh --memory subprocess   # + per-implementation peak
#                                                #   RSS in fresh processes
#
# Any argument is passed to benchmarks/bench_adamw.py (see --help). Results:
# benchmarks/results/{results.json,results.md,results.png} (a --quick run:
# benchmarks/results/quick/, not committed). torch and
# jax/optax are optional: if they fail to install or import, the benchmark
# still runs and marks them "not installed". Never touches .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-bench
STAMP=$VENV/.installed
if [ ! -f "$STAMP" ]; then
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet tensorflow==2.21.0 tf-keras==2.21.0 \
    matplotlib numpy
  "$VENV/bin/pip" install --quiet -e .
  # Optional competitors: a failure here is not fatal.
  "$VENV/bin/pip" install --quiet torch==2.13.0 \
    || echo "run.sh: torch not installed; benchmarking without it" >&2
  "$VENV/bin/pip" install --quiet jax jaxlib optax \
    || echo "run.sh: jax/optax not installed; benchmarking without them" >&2
  touch "$STAMP"
fi
# tf_adamw's fused CPU kernel, compiled for this venv's TensorFlow (once;
# cached by source, TF and CPU), so no timed first call pays for it.
"$VENV/bin/python" -m tf_adamw.kernels >/dev/null
has_out=0
quick=0
for a in "$@"; do
  case "$a" in
    --out|--out=*) has_out=1 ;;
    --quick) quick=1 ;;
  esac
done
if [ "$has_out" = 1 ]; then
  exec "$VENV/bin/python" benchmarks/bench_adamw.py "$@"
fi
# A smoke run never replaces the committed results of a full run.
out=benchmarks/results
[ "$quick" = 1 ] && out=benchmarks/results/quick
exec "$VENV/bin/python" benchmarks/bench_adamw.py --out "$out" "$@"
