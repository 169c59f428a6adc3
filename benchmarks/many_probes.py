#!/usr/bin/env python3
"""Plain-TF prototypes (no tf_adamw): per-variable vs flat/multi-tensor forms
of the `many` layout's stages (benchmarks/README.md, "What would meet the
goals"). One variant per process:

    python benchmarks/many_probes.py VARIANT N graph|xla [nograppler]
    TINY=1 / DISTINCT=1: all variables (24,) / all of different shapes
VARIANTS:
  norm_sep     sum of per-var reduce_sum(square(g)), add_n      (global norm)
  norm_concat  one concat of reshaped grads, one reduce_sum      (global norm)
  ema_sep      per-var avg.assign(m*avg + (1-m)*var)             (EMA)
  ema_flat     flat avg (1 variable): concat(var reads) -> one assign
  identityn    one op with all N grads as inputs (proxy for a multi-tensor kernel op)
  full_pervar  AdamW + EMA + global clip, per-variable ops (Keras-like math)
  full_flat    AdamW + EMA + global clip with m, v, avg as flat buffers:
               concat grads/params once, one elementwise update, split back
  full_flat2   the same, but the parameters are never concatenated: per
               variable read, slice of the flat update, write
  full_flat3   full_flat2 with each slice at a runtime offset (a scalar
               variable), so that same-shape variables could share a kernel
  split_assign only the write-back: one flat buffer split into the variables
  concat_reads only a concatenation of the variables' values
Prints JSON: trace, first run, median step, ops, peak RSS.
"""
import json, os, sys, time, resource
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import tensorflow as tf
from bench_adamw import many_shapes

variant, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if len(sys.argv) > 4 and sys.argv[4] == "nograppler":
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
jit = mode == "xla"
# warm up runtime
w = tf.Variable(tf.ones([8]))
tf.function(jit_compile=True)(lambda: w.assign(w * 2.0))().numpy()
tf.function(lambda: w.assign(w * 2.0))().numpy()

shapes = ([(24,)] * n if os.environ.get("TINY") else [(100 + i,) for i in range(n)] if os.environ.get("DISTINCT") else many_shapes(n))
sizes = [int(np.prod(s)) for s in shapes]
P = sum(sizes)
rng = np.random.default_rng(0)
vars_ = [tf.Variable((0.02 * rng.standard_normal(s)).astype(np.float32)) for s in shapes]
grads = [tf.constant((1e-3 * rng.standard_normal(s)).astype(np.float32)) for s in shapes]
LR, WD, B1, B2, EPS, EMA, CLIP = 1e-3, 0.004, 0.9, 0.999, 1e-7, 0.99, 1.0
it = tf.Variable(0, dtype=tf.int64)

def flat(ts):
    return tf.concat([tf.reshape(t, [-1]) for t in ts], 0)

if variant in ("ema_sep", "full_pervar"):
    avgs = [tf.Variable(tf.zeros(s)) for s in shapes]
if variant == "full_pervar":
    ms = [tf.Variable(tf.zeros(s)) for s in shapes]
    vs = [tf.Variable(tf.zeros(s)) for s in shapes]
if variant in ("ema_flat", "full_flat", "full_flat2", "split_assign", "concat_reads"):
    avg_f = tf.Variable(tf.zeros([P]))
if variant in ("full_flat3",):
    avg_f = tf.Variable(tf.zeros([P]))
    offs = [tf.Variable(int(o), dtype=tf.int32) for o in np.cumsum([0] + sizes[:-1])]
if variant in ("full_flat", "full_flat2", "full_flat3"):
    m_f = tf.Variable(tf.zeros([P])); v_f = tf.Variable(tf.zeros([P]))

def scalars():
    t = tf.cast(it + 1, tf.float32)
    alpha = LR * tf.sqrt(1 - tf.pow(B2, t)) / (1 - tf.pow(B1, t))
    first = tf.cast(tf.not_equal(it, 0), tf.float32) * EMA
    return alpha, first

def flat_adam_delta(alpha):
    """The flat variants' shared part: the gradients concatenated and
    globally clipped, `m_f` and `v_f` updated, and the flat Adam step
    `m * alpha / (sqrt(v) + eps)` returned."""
    g = flat(grads)
    norm = tf.sqrt(tf.reduce_sum(tf.square(g)))
    g = g * (CLIP * tf.minimum(1.0 / norm, 1.0 / CLIP))
    mn = m_f + (g - m_f) * (1 - B1)
    vn = v_f + (tf.square(g) - v_f) * (1 - B2)
    m_f.assign(mn); v_f.assign(vn)
    return mn * alpha / (tf.sqrt(vn) + EPS)


def write_back(deltas, mom):
    """Each variable decayed and moved by its flat piece of `deltas`, then
    the flat EMA of the new values."""
    news = []
    for var, d in zip(vars_, deltas):
        p = var.read_value()
        p = p - p * (LR * WD) - tf.reshape(d, var.shape)
        var.assign(p)
        news.append(p)
    avg_f.assign(mom * avg_f + (1 - mom) * flat(news))


def body():
    if variant == "norm_sep":
        return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
    if variant == "norm_concat":
        return tf.sqrt(tf.reduce_sum(tf.square(flat(grads))))
    if variant == "identityn":
        outs = tf.raw_ops.IdentityN(input=grads)
        return tf.reduce_sum(outs[0])
    if variant == "ema_sep":
        for v, a in zip(vars_, avgs):
            a.assign(EMA * a + (1 - EMA) * v)
        return tf.constant(0.0)
    if variant == "ema_flat":
        avg_f.assign(EMA * avg_f + (1 - EMA) * flat([v.read_value() for v in vars_]))
        return tf.constant(0.0)
    if variant == "split_assign":
        for var, piece in zip(vars_, tf.split(avg_f, sizes)):
            var.assign(tf.reshape(piece, var.shape))
        return tf.constant(0.0)
    if variant == "concat_reads":
        return tf.reduce_sum(flat([v.read_value() for v in vars_]))
    alpha, mom = scalars()
    if variant == "full_pervar":
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
        scale = CLIP * tf.minimum(1.0 / norm, 1.0 / CLIP)
        for var, g, m, v, a in zip(vars_, grads, ms, vs, avgs):
            g = g * scale
            p = var.read_value()
            p = p - p * (LR * WD)
            mn = m + (g - m) * (1 - B1)
            vn = v + (tf.square(g) - v) * (1 - B2)
            p = p - mn * alpha / (tf.sqrt(vn) + EPS)
            m.assign(mn); v.assign(vn); var.assign(p)
            a.assign(mom * a + (1 - mom) * p)
    elif variant == "full_flat":
        p = flat([v.read_value() for v in vars_])
        p = p - p * (LR * WD)
        p = p - flat_adam_delta(alpha)
        avg_f.assign(mom * avg_f + (1 - mom) * p)
        for var, piece in zip(vars_, tf.split(p, sizes)):
            var.assign(tf.reshape(piece, var.shape))
    elif variant == "full_flat2":
        write_back(tf.split(flat_adam_delta(alpha), sizes), mom)
    elif variant == "full_flat3":
        # Flat m, v, avg; each variable's slice at a *runtime* offset (a
        # scalar variable), so same-shape variables share one XLA kernel.
        delta = flat_adam_delta(alpha)
        write_back([tf.slice(delta, tf.reshape(off.read_value(), [1]), [size])
                    for off, size in zip(offs, sizes)], mom)
    it.assign_add(1)
    return tf.identity(it)

fn = tf.function(body, jit_compile=jit, autograph=False)
t0 = time.perf_counter(); conc = fn.get_concrete_function(); t1 = time.perf_counter()
r = fn(); np.asarray(r); t2 = time.perf_counter()
ts = []
for _ in range(30):
    t = time.perf_counter(); np.asarray(fn()); ts.append(time.perf_counter() - t)
print(json.dumps({"variant": variant, "n": n, "mode": mode,
    "grappler": len(sys.argv) <= 4,
    "trace_s": round(t1 - t0, 3), "first_run_s": round(t2 - t1, 3),
    "first_call_s": round(t2 - t0, 3),
    "step_ms": round(1e3 * float(np.median(ts)), 3),
    "ops": len(conc.graph.get_operations()),
    "ops_per_var": round(len(conc.graph.get_operations()) / n, 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
