#!/usr/bin/env python3
"""What one TF op costs tf2xla, per node (benchmarks/README.md, "Where
tf2xla's time went").

    python benchmarks/tf2xla_ops.py [OP ...] [--vars 1000]

For each OP (default: all below), a `tf.function(jit_compile=True)` writes
`OP(v)` into each of `--vars` float32 variables of 24 elements; prints the
time of `experimental_get_compiler_ir()(stage="hlo")` (tf2xla alone, no XLA
pass) for it and for `none` (each variable written with its own value): the
difference over `--vars` is the op's cost per node. TF 2.21 lowers some
ops through an MLIR pipeline built anew for every node (~4 ms each here)
and the others directly (~0.05 ms).
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import tensorflow as tf  # noqa: E402

from tf_adamw import update  # noqa: E402


# name -> op(x, c): x a variable's value, c a scalar read from a variable.
OPS = {
    "none": lambda x, c: x,
    "Mul": lambda x, c: x * c,
    "AddV2": lambda x, c: x + x,
    "Sub": lambda x, c: x - x,
    "Square": lambda x, c: tf.math.square(x),
    "RealDiv": lambda x, c: x / x,
    "Minimum": lambda x, c: tf.minimum(x, c),
    "Maximum": lambda x, c: tf.maximum(x, c),
    "Cast": lambda x, c: tf.cast(tf.cast(x, tf.float64), tf.float32),
    "SelectV2": lambda x, c: tf.where(c > 0, x, x),
    "Pow": lambda x, c: tf.pow(x, c),
    "Log": lambda x, c: tf.math.log(x),
    "Neg": lambda x, c: tf.math.negative(x),
    "Sqrt": lambda x, c: tf.math.sqrt(x),
    "Rsqrt": lambda x, c: tf.math.rsqrt(x),
    "Reciprocal": lambda x, c: tf.math.reciprocal(x),
    "Exp": lambda x, c: tf.math.exp(x),
    "Abs": lambda x, c: tf.math.abs(x),
    "Sign": lambda x, c: tf.math.sign(x),
    "Floor": lambda x, c: tf.math.floor(x),
    "IsFinite": lambda x, c: tf.cast(tf.math.is_finite(x), tf.float32),
    "Select": lambda x, c: tf.raw_ops.Select(
        condition=tf.fill(tf.shape(x), c > 0), x=x, y=x),
    # Traced for XLA, `update.sqrt` is `_UnaryOpsComposition` of `Sqrt`.
    "_UnaryOpsComposition(Sqrt)": lambda x, c: update.sqrt(x),
}


def tf2xla_seconds(op, variables, scalar):
    @tf.function(jit_compile=True, autograph=False)
    def step():
        c = scalar.read_value()
        for v in variables:
            v.assign(op(v.read_value(), c), read_value=False)
        return tf.constant(0)
    step.get_concrete_function()
    t = time.perf_counter()
    step.experimental_get_compiler_ir()(stage="hlo")
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ops", nargs="*", default=list(OPS))
    p.add_argument("--vars", type=int, default=1000)
    a = p.parse_args()
    unknown = [op for op in a.ops if op not in OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; known: {list(OPS)}")
    variables = [tf.Variable(tf.fill([24], 0.5)) for _ in range(a.vars)]
    scalar = tf.Variable(0.5)
    base = tf2xla_seconds(OPS["none"], variables, scalar)
    out = {"vars": a.vars, "none_s": round(base, 3), "ms_per_node": {}}
    for op in a.ops:
        if op == "none":
            continue
        s = tf2xla_seconds(OPS[op], variables, scalar)
        out["ms_per_node"][op] = round(1e3 * (s - base) / a.vars, 3)
        print(f"{op:28s} {s:7.3f} s  {1e3 * (s - base) / a.vars:7.3f} "
              "ms per node", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
