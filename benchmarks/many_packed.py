#!/usr/bin/env python3
"""Plain-TF prototype (no tf_adamw): under `jit_compile=True`, what fewer
state buffers per variable would buy (benchmarks/README.md, "The step under
XLA: a floor per buffer").

    python benchmarks/many_packed.py VARIANT [N]

AdamW + EMA + global clipping on N (1,000) variables of the `many` layout,
the math of `tf_adamw.update` (its functions), one nested `tf.function` call
per variable as tf_adamw traces it; the variants differ only in where the
state lives:

  separate  m, v and the average: three variables of the parameter's shape
            (tf_adamw, Keras): 4 buffers written per variable
  packed2   m and v in one [2, *shape] variable, the average apart: 3
  packed3   m, v and the average in one [3, *shape] variable: 2

Prints JSON: trace, tf2xla alone, first run, first call (without the
separate tf2xla timing), median step, peak RSS.
"""
import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench_adamw import many_shapes  # noqa: E402
from tf_adamw import update  # noqa: E402

LR, WD, B1, B2, EPS, EMA, CLIP = 1e-3, 0.004, 0.9, 0.999, 1e-7, 0.99, 1.0


def adam(g, p, mo, vo, alpha):
    """`tf_adamw.update`'s moments and decoupled step."""
    mn, vn, _ = update.adam_moments(g, mo, vo, None, one_minus_beta_1=1 - B1,
                                    one_minus_beta_2=1 - B2)
    return mn, vn, update.adamw_variable(p, mn, vn, alpha=alpha,
                                         epsilon=EPS, decay=LR * WD)


def separate(var, m, v, a, g, scale, alpha, mom):
    ao = a.read_value()
    mn, vn, p = adam(g * scale, var.read_value(), m.read_value(),
                     v.read_value(), alpha)
    m.assign(mn, read_value=False)
    v.assign(vn, read_value=False)
    var.assign(p, read_value=False)
    a.assign(ao * mom + p * (1 - mom), read_value=False)


def packed2(var, s, a, g, scale, alpha, mom):
    so, ao = s.read_value(), a.read_value()
    mn, vn, p = adam(g * scale, var.read_value(), so[0], so[1], alpha)
    s.assign(tf.stack([mn, vn]), read_value=False)
    var.assign(p, read_value=False)
    a.assign(ao * mom + p * (1 - mom), read_value=False)


def packed3(var, s, g, scale, alpha, mom):
    so = s.read_value()
    mn, vn, p = adam(g * scale, var.read_value(), so[0], so[1], alpha)
    var.assign(p, read_value=False)
    s.assign(tf.stack([mn, vn, so[2] * mom + p * (1 - mom)]),
             read_value=False)


def main():
    variant = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    body = {"separate": separate, "packed2": packed2,
            "packed3": packed3}[variant]
    warm = tf.Variable(tf.ones([8]))
    tf.function(jit_compile=True)(lambda: warm.assign(warm * 2.0))().numpy()
    shapes = many_shapes(n)
    rng = np.random.default_rng(0)
    params = [tf.Variable((0.02 * rng.standard_normal(s)).astype(np.float32))
              for s in shapes]
    grads = [tf.constant((1e-3 * rng.standard_normal(s)).astype(np.float32))
             for s in shapes]
    zeros = {"separate": lambda s: [tf.Variable(tf.zeros(s))
                                    for _ in range(3)],
             "packed2": lambda s: [tf.Variable(tf.zeros((2,) + tuple(s))),
                                   tf.Variable(tf.zeros(s))],
             "packed3": lambda s: [tf.Variable(tf.zeros((3,) + tuple(s)))],
             }[variant]
    state = [zeros(s) for s in shapes]
    iterations = tf.Variable(0, dtype=tf.int64)

    @tf.function(jit_compile=True, autograph=False)
    def step():
        t = tf.cast(iterations + 1, tf.float32)
        alpha = LR * tf.sqrt(1 - tf.pow(B2, t)) / (1 - tf.pow(B1, t))
        mom = tf.cast(tf.not_equal(iterations, 0), tf.float32) * EMA
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
        norm = tf.sqrt(tf.reduce_sum(tf.square(flat)))
        scale = CLIP * tf.minimum(1.0 / norm, 1.0 / CLIP)
        fn = tf.function(body, autograph=False, reduce_retracing=True)
        for p, s, g in zip(params, state, grads):
            fn(p, *s, g, scale, alpha, mom)
        iterations.assign_add(1)
        return tf.identity(iterations)

    t0 = time.perf_counter()
    step.get_concrete_function()
    t1 = time.perf_counter()
    step.experimental_get_compiler_ir()(stage="hlo")
    tf2xla = time.perf_counter() - t1
    t2 = time.perf_counter()
    step().numpy()
    t3 = time.perf_counter()
    times = []
    for _ in range(30):
        t = time.perf_counter()
        step().numpy()
        times.append(time.perf_counter() - t)
    print(json.dumps({
        "variant": variant, "n": n, "trace_s": t1 - t0, "tf2xla_s": tf2xla,
        "first_run_s": t3 - t2, "first_call_s": (t1 - t0) + (t3 - t2),
        "step_ms": 1e3 * float(np.median(times)),
        "peak_rss_gb": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 2**20}))


if __name__ == "__main__":
    main()
