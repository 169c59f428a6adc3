#!/usr/bin/env bash
# The one command: sets up .venv-bench (once) and runs the AdamW benchmark.
#
#   bash benchmarks/run.sh                       # full run: A,B,C ~5.5 min
#                                                # on 2 cores, then `many`
#   bash benchmarks/run.sh --quick               # smoke run, into
#                                                # benchmarks/results/quick/
#   bash benchmarks/run.sh --layouts B --rounds 3 --steps 10
#   bash benchmarks/run.sh --memory subprocess   # + per-implementation peak
#                                                #   RSS in fresh processes
#   bash benchmarks/run.sh --layouts many        # only the `many` layout
#   BENCH_MANY_ARGS="--vars 1000 --repeats 3" bash benchmarks/run.sh \
#       --layouts many
#
# Layouts A, B, C run in benchmarks/bench_adamw.py, which gets every
# argument (see its --help) except `many` in --layouts; the `many` layout
# (issue #13: 100 / 1,000 / 4,000 small variables, EMA + global clipping,
# each configuration in a fresh process) runs in benchmarks/bench_many.py,
# which gets --out, --quick and $BENCH_MANY_ARGS. Default: --layouts
# A,B,C,many. Results: benchmarks/results/{results.json,results.md,
# results.png,many.json,many.md} (a --quick run: benchmarks/results/quick/,
# not committed). torch and
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
special=0
layouts="A,B,C,many"
rest=()
args=("$@")
i=0
while [ "$i" -lt "${#args[@]}" ]; do
  a=${args[$i]}
  case "$a" in
    --out|--out=*) has_out=1 ;;
    --quick) quick=1 ;;
    --from-json|--from-json=*|--memory-child|--memory-child=*|-h|--help)
      special=1 ;;
  esac
  case "$a" in
    --layouts)
      i=$((i + 1))
      layouts=${args[$i]:-}
      ;;
    --layouts=*) layouts=${a#--layouts=} ;;
    *) rest+=("$a") ;;
  esac
  i=$((i + 1))
done
# A smoke run never replaces the committed results of a full run.
out=benchmarks/results
[ "$quick" = 1 ] && out=benchmarks/results/quick
out_arg=()
[ "$has_out" = 1 ] || out_arg=(--out "$out")
if [ "$special" = 1 ]; then
  exec "$VENV/bin/python" benchmarks/bench_adamw.py "${out_arg[@]}" "$@"
fi
if [ "$has_out" = 1 ]; then
  # The --out given, for both scripts.
  for ((j = 0; j < ${#args[@]}; j++)); do
    case "${args[$j]}" in
      --out) out=${args[$((j + 1))]} ;;
      --out=*) out=${args[$j]#--out=} ;;
    esac
  done
fi
many=0
abc=()
IFS=, read -r -a names <<< "$layouts"
for name in "${names[@]}"; do
  case "$name" in
    many) many=1 ;;
    "") ;;
    *) abc+=("$name") ;;
  esac
done
if [ "${#abc[@]}" -gt 0 ]; then
  abc_list=$(IFS=,; echo "${abc[*]}")
  "$VENV/bin/python" benchmarks/bench_adamw.py "${out_arg[@]}" \
    --layouts "$abc_list" ${rest[@]+"${rest[@]}"}
fi
if [ "$many" = 1 ]; then
  many_args=(--out "$out")
  [ "$quick" = 1 ] && many_args+=(--quick)
  # shellcheck disable=SC2086  # BENCH_MANY_ARGS: words, by design
  "$VENV/bin/python" benchmarks/bench_many.py "${many_args[@]}" \
    ${BENCH_MANY_ARGS:-}
fi
