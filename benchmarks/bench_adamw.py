#!/usr/bin/env python3
"""AdamW step benchmark: tf_adamw.AdamW against the other AdamWs, interleaved.

One process runs every implementation on one layout at a time, in rounds:
each round runs `--steps` timed steps of every implementation (in an order
rotated each round), so machine noise spreads evenly over them. Each
implementation owns its copy of the parameters; the gradients are fixed
random tensors made once per layout. A timed step is exactly one optimizer
update of all variables, synchronised (TF: `.numpy()` on a scalar the step
returns; JAX: `block_until_ready`; torch on CPU is synchronous).

Also measured in the same run: a memory-bound floor (in-place triad kernels
moving 28 B/param-equivalent bytes), first-call time (optimizer creation +
build + trace + compile + first step), peak memory (RSS high-water mark,
reset per phase through /proc/self/clear_refs), and the optimizer-state
bytes per parameter.

Usage (see benchmarks/README.md; `bash benchmarks/run.sh [ARGS]` sets up
.venv-bench and runs this with --out benchmarks/results):
    python benchmarks/bench_adamw.py --out benchmarks/results
    python benchmarks/bench_adamw.py --layouts A,B,C --rounds 5 --steps 20
    python benchmarks/bench_adamw.py --quick          # smoke run, seconds
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

# Before TensorFlow / Keras / JAX initialise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BYTES_PER_PARAM = 28  # read p, g, m, v + write p, m, v; float32
LR, WD, B1, B2, EPS = 1e-3, 0.004, 0.9, 0.999, 1e-7


# ---------------------------------------------------------------------------
# Layouts.

def layout_shapes(name):
    """The variable shapes of a layout, and a one-line description."""
    if name == "A":
        return [(4096, 4096)], "1 variable, 4096x4096"
    if name == "B":
        # 16 transformer blocks, d_model=296, d_ff=4*296: q/k/v/o kernels and
        # biases, two layer norms (gamma, beta), two FFN kernels and biases.
        d, f = 296, 4 * 296
        block = ([(d, d)] * 4 + [(d,)] * 4 + [(d,), (d,)]
                 + [(d, f), (f,), (f, d), (d,)] + [(d,), (d,)])
        return block * 16, ("16 transformer blocks (d=296, d_ff=1184): "
                            "4 attention kernels+biases, 2 FFN kernels+"
                            "biases, 2 layer norms")
    if name == "C":
        return [(44, 44), (44,)] * 100, "100 dense layers: 44x44 kernel + bias"
    if name == "many" or name.startswith("many:"):
        n = int(name.partition(":")[2] or MANY_VARS)
        shapes = many_shapes(n)
        return shapes, (f"{n} small variables of 10 shapes (24 to 576 "
                        "params; benchmarks/bench_many.py runs it with EMA "
                        "and global clipping)")
    raise ValueError(f"unknown layout {name!r}")


# The `many` layout: many small variables of varied shapes, as in a model
# with hundreds of layers (kernels, biases, norms, a few conv kernels). The
# 10 shapes hold 2,984 parameters, ~298 per variable: 1,000 variables are
# ~298k parameters. bench_many.py runs it at 100 / 1,000 / 4,000 variables.
MANY_VARS = 1000
MANY_CYCLE = [(24, 24), (24,), (16, 32), (32,), (20, 20), (3, 3, 4, 8),
              (64,), (40, 12), (96,), (8, 8, 8)]


def many_shapes(n, distinct=False):
    """The first `n` shapes of the `many` layout (MANY_CYCLE repeated).

    `distinct`: instead, `n` different 2-D shapes, those whose size is
    nearest 298 (XLA:CPU compiles one kernel per *distinct* fusion and
    reuses it for identical ones, so a model of repeated shapes compiles
    far faster than one of all-different shapes; this is the worst case).
    """
    if not distinct:
        return [MANY_CYCLE[i % len(MANY_CYCLE)] for i in range(n)]
    target = 298
    limit = 8 * target
    pairs = sorted(((r, c) for r in range(1, limit // 2 + 1)
                    for c in range(2, limit // r + 1)),
                   key=lambda rc: (abs(rc[0] * rc[1] - target), rc))
    if n > len(pairs):
        raise ValueError(f"at most {len(pairs)} distinct shapes")
    return pairs[:n]


# ---------------------------------------------------------------------------
# Memory: RSS and its high-water mark from /proc (Linux).

def _status_kb(key):
    try:
        with open("/proc/self/status") as f:
            m = re.search(key + r":\s+(\d+)\s*kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_bytes():
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def hwm_bytes():
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


def reset_hwm():
    """Resets VmHWM to the current RSS (Linux >= 4.0). False if it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# glibc's malloc keeps freed memory for reuse: a later implementation would
# then grow the RSS less than its true footprint. While memory is measured
# (setup), every allocation of 128 KiB or more is mmap-ed and so returned to
# the OS on free; while steps are timed, the threshold is fixed at 32 MiB,
# the value glibc's own dynamic threshold settles at (so graph-mode
# temporaries are reused as they would be in a normal process).
M_MMAP_THRESHOLD = -3
MEASURE_MMAP_THRESHOLD = 128 * 1024
TIMING_MMAP_THRESHOLD = 32 * 1024 * 1024


def set_mmap_threshold(nbytes):
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------
# Optional frameworks.

def try_import(name):
    try:
        return __import__(name), None
    except Exception as e:  # pylint: disable=broad-except
        return None, f"{type(e).__name__}: {e}"


def nbytes_of(shape, itemsize=4):
    return int(np.prod(shape, dtype=np.int64)) * itemsize if shape else 0


# ---------------------------------------------------------------------------
# Implementations. Each: __init__ makes its own parameter copy (not timed);
# first() creates the optimizer, builds it and runs the first step (timed as
# "first call"); step() runs one synchronised update; state_bytes() sums the
# optimizer's non-scalar state.

class Ctx:
    """Per-layout shared data: shapes, initial values, fixed gradients."""

    def __init__(self, shapes, seed=0):
        rng = np.random.default_rng(seed)
        self.shapes = shapes
        self.n_params = int(sum(np.prod(s) for s in shapes))
        self.init = [(0.02 * rng.standard_normal(s)).astype(np.float32)
                     for s in shapes]
        self.grads = [(1e-3 * rng.standard_normal(s)).astype(np.float32)
                      for s in shapes]
        self._tf = self._torch = self._jax = None

    def tf_grads(self):
        if self._tf is None:
            import tensorflow as tf
            self._tf = [tf.constant(g) for g in self.grads]
        return self._tf

    def torch_grads(self):
        if self._torch is None:
            import torch
            self._torch = [torch.from_numpy(g) for g in self.grads]
        return self._torch

    def jax_grads(self):
        if self._jax is None:
            import jax.numpy as jnp
            self._jax = [jnp.asarray(g) for g in self.grads]
        return self._jax


class Impl:
    key = label = None
    kind = "optimizer"  # or "floor"
    needs = ("tensorflow",)

    def __init__(self, ctx):
        self.ctx = ctx

    def first(self):
        raise NotImplementedError

    def step(self):
        raise NotImplementedError

    def state_bytes(self):
        return None


def _tf_state_bytes(variables):
    total = 0
    for v in variables:
        shape = tuple(v.shape)
        if len(shape) > 0:
            total += nbytes_of(shape, np.dtype(v.dtype.as_numpy_dtype
                                               if hasattr(v.dtype,
                                                          "as_numpy_dtype")
                                               else v.dtype).itemsize)
    return total


class OursEager(Impl):
    key, label = "ours_eager", "tf_adamw.AdamW (eager apply; fused kernel)"
    needs = ("tensorflow", "tf_adamw")
    jit = True
    fused = None  # the default: the fused CPU kernel

    def __init__(self, ctx):
        super().__init__(ctx)
        import tensorflow as tf
        self.vars = [tf.Variable(x) for x in ctx.init]
        self.grads = ctx.tf_grads()

    def _make(self):
        import tf_adamw
        self.opt = tf_adamw.AdamW(learning_rate=LR, weight_decay=WD,
                                  beta_1=B1, beta_2=B2, epsilon=EPS,
                                  jit_compile=self.jit, fused=self.fused)
        self.opt.build(self.vars)
        assert self.opt.uses_fused_kernel == (self.fused is None), self.key

    def first(self):
        self._make()
        self.step()

    def step(self):
        return self.opt.apply(self.grads, self.vars).numpy()

    def state_bytes(self):
        return _tf_state_bytes(self.opt.variables)


class OursFunction(OursEager):
    key, label = ("ours_tffn",
                  "tf_adamw.AdamW (inside user tf.function; fused kernel)")

    def first(self):
        import tensorflow as tf
        self._make()
        opt, grads, variables = self.opt, self.grads, self.vars

        @tf.function
        def fn():
            return tf.identity(opt.apply(grads, variables))
        self.fn = fn
        self.step()

    def step(self):
        return self.fn().numpy()


class OursXla(OursFunction):
    key, label = ("ours_xla", "tf_adamw.AdamW(fused=False): its XLA step "
                  "(the TPU/GPU path), inside user tf.function")
    fused = False


class OursNoJit(OursFunction):
    key, label = ("ours_nojit", "tf_adamw.AdamW(fused=False, "
                  "jit_compile=False), inside user tf.function")
    jit = False
    fused = False


class KerasBase(Impl):
    needs = ("tensorflow", "keras")
    jit = False

    def __init__(self, ctx):
        super().__init__(ctx)
        import keras
        self.vars = [keras.Variable(x, dtype="float32") for x in ctx.init]
        self.grads = ctx.tf_grads()

    def first(self):
        import keras
        import tensorflow as tf
        self.opt = keras.optimizers.AdamW(
            learning_rate=LR, weight_decay=WD, beta_1=B1, beta_2=B2,
            epsilon=EPS)
        self.opt.build(self.vars)
        opt, grads, variables = self.opt, self.grads, self.vars

        @tf.function(jit_compile=self.jit)
        def fn():
            opt.apply_gradients(zip(grads, variables))
            return tf.identity(opt.iterations.value)
        self.fn = fn
        self.step()

    def step(self):
        return self.fn().numpy()

    def state_bytes(self):
        total = 0
        for v in self.opt.variables:
            if len(v.shape) > 0:
                total += nbytes_of(tuple(v.shape),
                                   np.dtype(v.dtype).itemsize)
        return total


class KerasGraph(KerasBase):
    key, label = "keras_graph", "keras.optimizers.AdamW (tf.function)"


class KerasXla(KerasBase):
    key, label = "keras_xla", "keras.optimizers.AdamW (tf.function, XLA)"
    jit = True


class TfKeras(Impl):
    key, label = "tf_keras", "tf_keras.optimizers.AdamW (tf.function)"
    needs = ("tensorflow", "tf_keras")

    def __init__(self, ctx):
        super().__init__(ctx)
        import tensorflow as tf
        self.vars = [tf.Variable(x) for x in ctx.init]
        self.grads = ctx.tf_grads()

    def first(self):
        import tensorflow as tf
        import tf_keras
        self.opt = tf_keras.optimizers.AdamW(
            learning_rate=LR, weight_decay=WD, beta_1=B1, beta_2=B2,
            epsilon=EPS)  # jit_compile=True by default: XLA per variable
        self.opt.build(self.vars)
        opt, grads, variables = self.opt, self.grads, self.vars

        @tf.function
        def fn():
            opt.apply_gradients(zip(grads, variables))
            return tf.identity(opt.iterations)
        self.fn = fn
        self.step()

    def step(self):
        return self.fn().numpy()

    def state_bytes(self):
        return _tf_state_bytes(self.opt.variables)


class RawAdam(Impl):
    key, label = "raw_adam", "tf.raw_ops.ResourceApplyAdam (no weight decay)"
    decay = False

    def __init__(self, ctx):
        super().__init__(ctx)
        import tensorflow as tf
        self.vars = [tf.Variable(x) for x in ctx.init]
        self.grads = ctx.tf_grads()

    def first(self):
        import tensorflow as tf
        self.m = [tf.Variable(tf.zeros_like(x)) for x in self.ctx.init]
        self.v = [tf.Variable(tf.zeros_like(x)) for x in self.ctx.init]
        self.t = tf.Variable(0, dtype=tf.int64)
        variables, ms, vs, grads = self.vars, self.m, self.v, self.grads
        decay = self.decay

        @tf.function
        def fn():
            t = tf.cast(self.t.assign_add(1), tf.float32)
            lr = tf.constant(LR)
            b1, b2 = tf.constant(B1), tf.constant(B2)
            b1p, b2p = tf.pow(b1, t), tf.pow(b2, t)
            eps = tf.constant(EPS)
            for var, m, v, g in zip(variables, ms, vs, grads):
                if decay:  # decoupled weight decay as a separate op
                    var.assign_sub(var * (LR * WD))
                tf.raw_ops.ResourceApplyAdam(
                    var=var.handle, m=m.handle, v=v.handle, beta1_power=b1p,
                    beta2_power=b2p, lr=lr, beta1=b1, beta2=b2, epsilon=eps,
                    grad=g, use_locking=False)
            return tf.identity(self.t)
        self.fn = fn
        self.step()

    def step(self):
        return self.fn().numpy()

    def state_bytes(self):
        return _tf_state_bytes(self.m + self.v)


class RawAdamDecay(RawAdam):
    key = "raw_adamw"
    label = "tf.raw_ops.ResourceApplyAdam + decay op (AdamW)"
    decay = True


class TorchFused(Impl):
    key, label = "torch_fused", "torch.optim.AdamW(fused=True)"
    needs = ("torch",)

    def __init__(self, ctx):
        super().__init__(ctx)
        import torch
        self.params = [torch.nn.Parameter(torch.from_numpy(x.copy()))
                       for x in ctx.init]
        for p, g in zip(self.params, ctx.torch_grads()):
            p.grad = g

    def first(self):
        import torch
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=(B1, B2),
                                     eps=EPS, weight_decay=WD, fused=True)
        self.step()

    def step(self):
        self.opt.step()  # CPU: synchronous

    def state_bytes(self):
        total = 0
        for state in self.opt.state.values():
            for t in state.values():
                if hasattr(t, "dim") and t.dim() > 0:
                    total += t.numel() * t.element_size()
        return total


class TorchFused1Thread(TorchFused):
    """The same with torch's intra-op pool at 1 thread during the step.

    On a shared 2-core machine, torch's OpenMP regions (one per tensor)
    stall whenever one of the two threads is descheduled; one thread is
    immune, and one core can saturate this machine's memory bandwidth
    (see the numpy floor).
    """
    key = "torch_fused_1t"
    label = "torch.optim.AdamW(fused=True), 1 thread"

    def step(self):
        import torch
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.opt.step()
        finally:
            torch.set_num_threads(n)


class Optax(Impl):
    key, label = "optax", "optax.adamw (jax.jit, donated buffers)"
    needs = ("jax", "optax")

    def __init__(self, ctx):
        super().__init__(ctx)
        import jax.numpy as jnp
        self.params = [jnp.asarray(x) for x in ctx.init]
        self.grads = ctx.jax_grads()

    def first(self):
        import jax
        import optax
        tx = optax.adamw(learning_rate=LR, b1=B1, b2=B2, eps=EPS,
                         weight_decay=WD)
        self.state = tx.init(self.params)

        def update(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state
        self.fn = jax.jit(update, donate_argnums=(0, 1))
        self.step()

    def step(self):
        import jax
        self.params, self.state = self.fn(self.params, self.state, self.grads)
        jax.block_until_ready(self.params)

    def state_bytes(self):
        import jax
        return sum(int(x.size) * x.dtype.itemsize
                   for x in jax.tree_util.tree_leaves(self.state)
                   if getattr(x, "ndim", 0) > 0)


# Floor kernels: an in-place triad `a += s*c` (read a, read c, write a:
# 12 B/element, the read-modify-write pattern of AdamW, so no
# write-allocate traffic), over n = 28*P/12 elements: the same bytes as one
# AdamW step on P parameters.

class FloorBase(Impl):
    kind = "floor"

    @property
    def n_elems(self):
        return int(math.ceil(BYTES_PER_PARAM * self.ctx.n_params / 12))


class FloorXlaTf(FloorBase):
    key, label = "floor_xla_tf", "floor: a += s*c, TF XLA (tf.Variable)"

    def __init__(self, ctx):
        super().__init__(ctx)
        import tensorflow as tf
        self.a = tf.Variable(tf.zeros([self.n_elems]))
        self.c = tf.Variable(tf.fill([self.n_elems], 1e-3))

    def first(self):
        import tensorflow as tf
        a, c = self.a, self.c

        @tf.function(jit_compile=True)
        def fn():
            a.assign_add(c * 1e-3)
            return tf.zeros([])
        self.fn = fn
        self.step()

    def step(self):
        return self.fn().numpy()


class FloorNumpy(FloorBase):
    key, label = "floor_numpy", "floor: a += c, numpy (1 thread)"
    needs = ()

    def __init__(self, ctx):
        super().__init__(ctx)
        self.a = np.zeros(self.n_elems, np.float32)
        self.c = np.full(self.n_elems, 1e-6, np.float32)

    def first(self):
        self.step()

    def step(self):
        np.add(self.a, self.c, out=self.a)


class FloorTorch(FloorBase):
    key, label = "floor_torch", "floor: a.add_(c, alpha=s), torch"
    needs = ("torch",)

    def __init__(self, ctx):
        super().__init__(ctx)
        import torch
        self.a = torch.zeros(self.n_elems)
        self.c = torch.full((self.n_elems,), 1e-3)

    def first(self):
        self.step()

    def step(self):
        self.a.add_(self.c, alpha=1e-3)


class FloorJax(FloorBase):
    key, label = "floor_jax", "floor: a + s*c, jax.jit (a donated)"
    needs = ("jax",)

    def __init__(self, ctx):
        super().__init__(ctx)
        import jax.numpy as jnp
        self.a = jnp.zeros(self.n_elems, jnp.float32)
        self.c = jnp.full(self.n_elems, 1e-3, jnp.float32)

    def first(self):
        import jax
        self.fn = jax.jit(lambda a, c: a + 1e-3 * c, donate_argnums=0)
        self.step()

    def step(self):
        self.a = self.fn(self.a, self.c)
        self.a.block_until_ready()


IMPLS = [OursEager, OursFunction, OursXla, OursNoJit, KerasGraph, KerasXla,
         TfKeras,
         RawAdam, RawAdamDecay, TorchFused, TorchFused1Thread, Optax,
         FloorXlaTf, FloorNumpy, FloorTorch, FloorJax]
OURS = ("ours_eager", "ours_tffn", "ours_xla")
EXTRAS = {"ours_nojit"}  # run with --all (or --only)


# ---------------------------------------------------------------------------
# Running.

def log(*args):
    print(*args, flush=True)


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def warm_up_runtimes(available):
    """Pays one-time runtime start-up (XLA/LLVM, thread pools) before any
    first-call measurement, so no implementation is charged for it."""
    if "tensorflow" in available:
        import tensorflow as tf
        x = tf.Variable(tf.ones([64]))

        @tf.function(jit_compile=True)
        def f():
            x.assign(x * 2.0 + 1.0)
            return tf.reduce_sum(x)

        @tf.function
        def g():
            x.assign(x * 0.5)
            return tf.reduce_sum(x)
        f().numpy()
        g().numpy()
        import keras  # noqa: F401  (import cost outside the first call)
    if "tf_keras" in available:
        import tf_keras  # noqa: F401
    if "torch" in available:
        import torch
        p = torch.nn.Parameter(torch.ones(64))
        p.grad = torch.ones(64)
        torch.optim.AdamW([p], fused=True).step()
    if "jax" in available:
        import jax
        import jax.numpy as jnp
        jax.jit(lambda a: a * 2 + 1)(jnp.ones(64)).block_until_ready()
    if "optax" in available:
        import optax  # noqa: F401


def _tf_memory_info():
    """TF's CPU allocator stats (bytes in use, peak), or None.

    With oneDNN on (TF's default on x86), TF pools tensors of 256 KiB and
    more in a BFC allocator that never returns memory to the OS, so RSS
    deltas miss what an implementation reuses from the pool; its
    statistics count exactly the bytes in use. Smaller tensors are not
    counted.
    """
    try:
        import tensorflow as tf
        return tf.config.experimental.get_memory_info("CPU:0")
    except Exception:  # pylint: disable=broad-except
        return None


def _tf_reset_peak():
    import tensorflow as tf
    tf.config.experimental.reset_memory_stats("CPU:0")


class MemoryProbe:
    """Peak memory over a block: TF allocator bytes and process RSS."""

    def __init__(self, impl, can_reset):
        self.use_tf = "tensorflow" in impl.needs and (
            _tf_memory_info() is not None)
        self.can_reset = can_reset

    def __enter__(self):
        gc.collect()
        if self.use_tf:
            _tf_reset_peak()
            self.tf0 = _tf_memory_info()["current"]
        self.rss0 = rss_bytes()
        if self.can_reset:
            reset_hwm()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return
        self.rss_peak = self.retained = None
        if self.can_reset and self.rss0 is not None:
            self.rss_peak = max(0, hwm_bytes() - self.rss0) / 2**20
            self.retained = (rss_bytes() - self.rss0) / 2**20
        if self.use_tf:
            self.alloc_peak = (_tf_memory_info()["peak"] - self.tf0) / 2**20
            self.method = "tf_allocator"
        else:
            self.alloc_peak = self.rss_peak
            self.method = "rss"


def measure_memory(impl, can_reset):
    """Times `impl.first()` and measures its memory."""
    with MemoryProbe(impl, can_reset) as m:
        t0 = time.perf_counter()
        impl.first()
        first_call_s = time.perf_counter() - t0
    return {"first_call_s": first_call_s,
            "mem_first_call_peak_mb": m.alloc_peak,
            "mem_first_call_rss_mb": m.rss_peak,
            "mem_retained_rss_mb": m.retained,
            "mem_method": m.method}


def measure_step_memory(impl, can_reset):
    """Peak memory increase during one steady-state step."""
    with MemoryProbe(impl, can_reset) as m:
        impl.step()
    return {"mem_step_peak_mb": m.alloc_peak, "mem_step_rss_mb": m.rss_peak}


def warm_up_impls(impl_classes, available):
    """Runs every implementation once on a tiny layout before measuring.

    The first XLA compilation of a real kernel in a process pays several
    seconds of one-time start-up (measured here: ~4 s), which would be
    charged to whichever implementation happens to run first. "First call"
    in the report is the per-model cost: trace + compile + first step of an
    implementation whose library is already initialised. The one-time
    costs are recorded here (meta.process_warmup_s).
    """
    ctx = Ctx([(256, 1024), (1024,)], seed=1)
    out = {}
    for cls in impl_classes:
        if any(m not in available for m in cls.needs):
            continue
        t0 = time.perf_counter()
        try:
            impl = cls(ctx)
            impl.first()
            impl.step()
            out[cls.key] = time.perf_counter() - t0
        except Exception as e:  # pylint: disable=broad-except
            out[cls.key] = f"error: {type(e).__name__}: {e}"[:300]
        impl = None
    log("warm-up (tiny layout, one-time library start-up): " + ", ".join(
        f"{k} {v:.1f}s" if isinstance(v, float) else f"{k} {v}"
        for k, v in out.items()))
    gc.collect()
    return out


def run_layout(name, impl_classes, available, args):
    shapes, description = layout_shapes(name)
    ctx = Ctx(shapes)
    P = ctx.n_params
    log(f"\n=== layout {name}: {len(shapes)} variables, {P:,} parameters "
        f"({description})")
    results = {}
    live = []
    can_reset = reset_hwm()
    set_mmap_threshold(MEASURE_MMAP_THRESHOLD)
    for cls in impl_classes:
        res = {"label": cls.label, "kind": cls.kind}
        results[cls.key] = res
        missing = [m for m in cls.needs if m not in available]
        if missing:
            res["status"] = "not installed: " + ", ".join(missing)
            log(f"  {cls.key:14s} {res['status']}")
            continue
        try:
            impl = cls(ctx)  # its own parameter copy: not part of the timing
            res.update(measure_memory(impl, can_reset))
            for _ in range(args.warmup):
                impl.step()
            res.update(measure_step_memory(impl, can_reset))
            sb = impl.state_bytes()
            if sb is not None:
                res["state_bytes_per_param"] = sb / P
            res["status"] = "ok"
            res["times_s"] = []
            res["round_medians_ms"] = []
            live.append((cls.key, impl))
            log(f"  {cls.key:14s} first call {res['first_call_s']:7.2f} s")
        except Exception as e:  # pylint: disable=broad-except
            res["status"] = f"error: {type(e).__name__}: {e}"[:500]
            log(f"  {cls.key:14s} {res['status']}")

    # Interleaved rounds.
    set_mmap_threshold(TIMING_MMAP_THRESHOLD)
    for r in range(args.rounds):
        k = r % max(len(live), 1)
        order = live[k:] + live[:k]
        for key, impl in order:
            res = results[key]
            gc.collect()
            time.sleep(args.pause)  # let other runtimes' spinning threads idle
            times = []
            gc.disable()
            try:
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    impl.step()
                    times.append(time.perf_counter() - t0)
            finally:
                gc.enable()
            res["times_s"].extend(times)
            res["round_medians_ms"].append(1e3 * float(np.median(times)))
        log(f"  round {r + 1}/{args.rounds} done")

    for key, res in results.items():
        times = res.pop("times_s", None)
        if not times:
            continue
        ms = [1e3 * t for t in times]
        med = float(np.median(ms))
        res.update({
            "median_ms": med,
            "p10_ms": percentile(ms, 10),
            "p25_ms": percentile(ms, 25), "p75_ms": percentile(ms, 75),
            "min_ms": float(min(ms)), "max_ms": float(max(ms)),
            "n_samples": len(ms),
            "gb_per_s": BYTES_PER_PARAM * P / (med * 1e-3) / 1e9,
        })

    floors = {k: r for k, r in results.items()
              if r["kind"] == "floor" and "median_ms" in r}
    floor = None
    if floors:
        fk = min(floors, key=lambda k: floors[k]["median_ms"])
        floor = {"kernel": fk, "ms": floors[fk]["median_ms"],
                 "gb_per_s": floors[fk]["gb_per_s"]}
        for res in results.values():
            if "median_ms" in res:
                res["ratio_to_floor"] = res["median_ms"] / floor["ms"]
    del live, ctx
    gc.collect()
    if args.memory == "subprocess":
        for cls in impl_classes:
            if results[cls.key].get("status") == "ok":
                results[cls.key].update(memory_subprocess(name, cls.key))
    return {"n_vars": len(shapes), "n_params": P, "description": description,
            "floor": floor, "impls": results,
            "memory_hwm_reset": can_reset}


def memory_subprocess(layout, key):
    """Peak memory of one implementation, alone in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", key,
           "--layouts", layout]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            res = json.loads(line)
            log(f"  {key:14s} alone: first-call RSS peak "
                f"{res.get('sub_rss_first_call_mb') or float('nan'):.0f} MiB,"
                f" step RSS peak {res.get('sub_rss_step_mb') or 0:.0f} MiB")
            return res
    return {"sub_error": (proc.stderr or proc.stdout)[-500:]}


def memory_child(key, layout, args):
    """In a fresh process: one implementation's memory, printed as JSON."""
    set_mmap_threshold(MEASURE_MMAP_THRESHOLD)
    cls = {c.key: c for c in IMPLS}[key]
    available = set()
    for mod in cls.needs:
        if try_import(mod)[0] is not None:
            available.add(mod)
    warm_up_runtimes(available)
    warm_up_impls([cls], available)
    ctx = Ctx(layout_shapes(layout)[0])
    for getter, mod in ((ctx.tf_grads, "tensorflow"),
                        (ctx.torch_grads, "torch"), (ctx.jax_grads, "jax")):
        if mod in cls.needs:
            getter()
    impl = cls(ctx)
    can_reset = reset_hwm()
    res = measure_memory(impl, can_reset)
    for _ in range(args.warmup):
        impl.step()
    res.update(measure_step_memory(impl, can_reset))
    out = {"sub_rss_first_call_mb": res["mem_first_call_rss_mb"],
           "sub_rss_step_mb": res["mem_step_rss_mb"],
           "sub_retained_rss_mb": res["mem_retained_rss_mb"]}
    out["sub_process_hwm_mb"] = hwm_bytes() / 2**20
    print(json.dumps(out), flush=True)


def targets(layouts):
    """The ratios the project's targets are about, per mode of ours."""
    out = {}

    def med(layout, key):
        lay = layouts.get(layout)
        if not lay:
            return None
        return lay["impls"].get(key, {}).get("median_ms")

    for ours in OURS:
        t = {}
        for layout, need in (("B", 2.0), ("C", 3.0)):
            kg, kx, o = (med(layout, "keras_graph"), med(layout, "keras_xla"),
                         med(layout, ours))
            best = min([x for x in (kg, kx) if x is not None], default=None)
            if best is not None and o is not None:
                sp = best / o
                t[f"{layout}_speedup_vs_keras_best"] = {
                    "value": sp, "target": f">= {need}x",
                    "keras_best": "keras_graph" if best == kg else "keras_xla",
                    "met": sp >= need}
        if "A" in layouts and layouts["A"]["floor"] and med("A", ours):
            ratio = med("A", ours) / layouts["A"]["floor"]["ms"]
            t["A_ratio_to_floor"] = {"value": ratio, "target": "<= 1.2x",
                                     "met": ratio <= 1.2}
        if "B" in layouts:
            fc = layouts["B"]["impls"].get(ours, {}).get("first_call_s")
            if fc is not None:
                t["B_first_call_s"] = {"value": fc, "target": "< 1 s",
                                       "met": fc < 1.0}
        sbs = [lay["impls"].get(ours, {}).get("state_bytes_per_param")
               for lay in layouts.values()]
        sbs = [s for s in sbs if s is not None]
        if sbs:
            t["state_bytes_per_param"] = {
                "value": max(sbs), "target": "== 8",
                "met": all(abs(s - 8.0) < 1e-9 for s in sbs)}
        out[ours] = t
    return out


def versions():
    out = {"python": platform.python_version()}
    for mod in ("numpy", "tensorflow", "keras", "tf_keras", "torch", "jax",
                "jaxlib", "optax", "matplotlib"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pylint: disable=broad-except
            out[mod] = None
    return out


def git_state():
    """The commit benchmarked, and whether tf_adamw/ had local changes."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root,
                              capture_output=True, text=True,
                              check=False).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tf_adamw"], cwd=root,
            capture_output=True, text=True, check=False).stdout.strip()
        return {"commit": head or None,
                "tf_adamw_uncommitted_changes": bool(dirty)}
    except OSError:
        return {"commit": None}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


# ---------------------------------------------------------------------------
# Report: markdown table and chart.

def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def markdown(data):
    lines = []
    for name, lay in data["layouts"].items():
        fl = lay["floor"]
        lines.append(
            f"**Layout {name}** — {lay['n_vars']} variables, "
            f"{lay['n_params']:,} parameters ({lay['description']}). "
            + (f"Floor: {fl['ms']:.3f} ms = {fl['gb_per_s']:.1f} GB/s "
               f"({fl['kernel']})." if fl else "No floor measured."))
        lines.append("")
        sub = any("sub_rss_first_call_mb" in r for r in lay["impls"].values())
        lines.append(
            "| implementation | median ms/step | IQR | min–max | "
            "GB/s @28 B/param | × floor | first call s | "
            "first-call peak alloc MiB | step peak alloc MiB | "
            "first-call ΔRSS MiB | "
            + ("alone: first-call ΔRSS MiB | " if sub else "")
            + "state B/param |")
        lines.append("|---|" + "---:|" * (10 + sub))
        for key, r in lay["impls"].items():
            if r.get("status") != "ok":
                lines.append(f"| {r['label']} | {r.get('status')} |"
                             + " |" * (9 + sub))
                continue
            lines.append(
                f"| {r['label']} | {r['median_ms']:.3f} | "
                f"{r['p25_ms']:.3f}–{r['p75_ms']:.3f} | "
                f"{r['min_ms']:.3f}–{r['max_ms']:.3f} | "
                f"{r['gb_per_s']:.1f} | {fmt(r.get('ratio_to_floor'), '.2f')} | "
                f"{r['first_call_s']:.2f} | "
                f"{fmt(r.get('mem_first_call_peak_mb'), '.0f')}"
                f"{'' if r.get('mem_method') == 'tf_allocator' else '*'} | "
                f"{fmt(r.get('mem_step_peak_mb'), '.0f')}"
                f"{'' if r.get('mem_method') == 'tf_allocator' else '*'} | "
                f"{fmt(r.get('mem_first_call_rss_mb'), '.0f')} | "
                + (f"{fmt(r.get('sub_rss_first_call_mb'), '.0f')} | "
                   if sub else "")
                + f"{fmt(r.get('state_bytes_per_param'), '.2f')} |")
        lines.append("")
    lines.append(
        "Peak alloc: bytes in use in TF's CPU allocator (tensors >= 256 KiB) "
        "above what was in use before; * = process RSS high-water mark "
        "instead (non-TF implementations). ΔRSS includes compiler memory "
        "but misses memory reused from TF's pool. See README.")
    lines.append("")
    lines.append("**Speed-up of our AdamW** = other's time / ours, from "
                 "medians (and, in brackets, from minima: the least "
                 "disturbed steps); > 1 means ours is faster.")
    lines.append("")
    others = [k for k in ("keras_graph", "keras_xla", "tf_keras", "raw_adam",
                          "raw_adamw", "torch_fused", "torch_fused_1t",
                          "optax")
              if any(k in lay["impls"] for lay in data["layouts"].values())]
    labels = {"keras_graph": "Keras 3 graph", "keras_xla": "Keras 3 XLA",
              "tf_keras": "tf_keras", "raw_adam": "ResourceApplyAdam",
              "raw_adamw": "ResourceApplyAdam+decay",
              "torch_fused": "torch fused",
              "torch_fused_1t": "torch fused 1 thread", "optax": "optax"}
    lines.append("| layout | ours | " + " | ".join(labels[k] for k in others)
                 + " | ours ÷ floor |")
    lines.append("|---|---|" + "---:|" * (len(others) + 1))
    for name, lay in data["layouts"].items():
        for ours in OURS:
            o = lay["impls"].get(ours, {})
            if "median_ms" not in o:
                continue
            cells = []
            for k in others:
                r = lay["impls"].get(k, {})
                if "median_ms" not in r:
                    cells.append("—")
                    continue
                cells.append(f"{r['median_ms'] / o['median_ms']:.2f} "
                             f"({r['min_ms'] / o['min_ms']:.2f})")
            fl = lay["floor"]
            fk = lay["impls"].get(fl["kernel"], {}) if fl else {}
            cells.append(f"{o['median_ms'] / fl['ms']:.2f}× "
                         f"({o['min_ms'] / fk['min_ms']:.2f}×)" if fl else "—")
            lines.append(f"| {name} | {ours} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("**Targets** (our AdamW; ✅ met, ❌ missed)")
    lines.append("")
    lines.append("| target | " + " | ".join(data["targets"]) + " |")
    lines.append("|---|" + "---:|" * len(data["targets"]))
    names = []
    for t in data["targets"].values():
        for k in t:
            if k not in names:
                names.append(k)
    for k in names:
        row = []
        tgt = ""
        for t in data["targets"].values():
            v = t.get(k)
            if v is None:
                row.append("—")
                continue
            tgt = v["target"]
            unit = "s" if k.endswith("_s") else ("" if "bytes" in k else "×")
            row.append(f"{v['value']:.2f}{unit} {'✅' if v['met'] else '❌'}")
        lines.append(f"| {k} ({tgt}) | " + " | ".join(row) + " |")
    lines.append("")
    if data.get("xla_fusions"):
        lines.append("**Compiled step (optimized HLO, entry computation)**")
        lines.append("")
        for name, res in data["xla_fusions"].items():
            lines.append(f"- {name}: {res.get('summary', res.get('status'))}")
        lines.append("")
    return "\n".join(lines)


def chart(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    layouts = data["layouts"]
    n = len(layouts)

    def log_axis(ax, lo, hi):
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.5, hi * 4)
        ax.xaxis.set_major_locator(ticker.LogLocator(
            base=10, subs=(1, 2, 5) if hi / lo < 300 else (1,)))
        ax.xaxis.set_major_formatter(
            ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(axis="x", which="major", alpha=0.3)

    def ylabels(rows):
        return [r["label"].replace(" (", "\n(") for _, r in rows]

    fig, axes = plt.subplots(2, n, figsize=(6.4 * n, 11), squeeze=False)
    for col, (name, lay) in enumerate(layouts.items()):
        rows = [(k, r) for k, r in lay["impls"].items()
                if r.get("status") == "ok"]
        if not rows:
            continue
        rows.sort(key=lambda kr: kr[1]["median_ms"])
        med = np.array([r["median_ms"] for _, r in rows])
        p25 = np.array([r["p25_ms"] for _, r in rows])
        p75 = np.array([r["p75_ms"] for _, r in rows])
        colors = ["tab:red" if k.startswith("ours") else
                  ("tab:gray" if r["kind"] == "floor" else "tab:blue")
                  for k, r in rows]
        ax = axes[0][col]
        y = np.arange(len(rows))
        ax.barh(y, med, xerr=[med - p25, p75 - med], color=colors,
                capsize=2, error_kw={"lw": 0.8})
        ax.set_yticks(y)
        ax.set_yticklabels(ylabels(rows), fontsize=6.5)
        ax.invert_yaxis()
        log_axis(ax, p25.min(), p75.max())
        ax.set_xlabel("median ms/step (log scale; whiskers: IQR)")
        fl = lay["floor"]
        ax.set_title(f"Layout {name}: {lay['n_vars']} vars, "
                     f"{lay['n_params'] / 1e6:.2f}M params"
                     + (f"\nfloor {fl['ms']:.2f} ms = {fl['gb_per_s']:.0f} "
                        "GB/s at 28 B/param" if fl else ""), fontsize=10)
        if fl:
            ax.axvline(fl["ms"], color="k", ls="--", lw=0.8)
        for yi, m, hi in zip(y, med, p75):
            ratio = f" ({m / fl['ms']:.1f}x)" if fl else ""
            ax.text(max(m, hi) * 1.08, yi, f"{m:.2f}{ratio}", va="center",
                    fontsize=6.5)
        # First-call times of the optimizers.
        ax2 = axes[1][col]
        opt_rows = [(k, r) for k, r in rows if r["kind"] == "optimizer"]
        opt_rows.sort(key=lambda kr: kr[1]["first_call_s"])
        y2 = np.arange(len(opt_rows))
        fc = np.array([r["first_call_s"] for _, r in opt_rows])
        ax2.barh(y2, fc, color=["tab:red" if k.startswith("ours") else
                                "tab:blue" for k, _ in opt_rows])
        ax2.set_yticks(y2)
        ax2.set_yticklabels(ylabels(opt_rows), fontsize=6.5)
        ax2.invert_yaxis()
        log_axis(ax2, fc.min(), fc.max())
        ax2.set_xlabel("first call: create + build + trace + compile + "
                       "1 step (s, log scale)")
        for yi, v in zip(y2, fc):
            ax2.text(v * 1.08, yi, f"{v:.2f}", va="center", fontsize=6.5)
    meta = data["meta"]
    fig.suptitle(
        f"AdamW step, float32, {meta['nproc']} CPU cores, "
        f"{meta['rounds']} interleaved rounds x {meta['steps']} steps "
        f"(load average {meta['loadavg_start'][0]:.1f} at start) — red: "
        "tf_adamw, blue: others, grey: memory-bound floor kernels "
        "(dashed line: the fastest)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# XLA dump analysis (a subprocess: XLA_FLAGS must be set before TF starts).

def hlo_analysis(layout, impl, out_dir):
    script = os.path.join(HERE, "xla_fusions.py")
    out = os.path.join(out_dir, f"xla_fusions_{impl}_{layout}.json")
    cmd = [sys.executable, script, "--layout", layout, "--impl", impl,
           "--json", out]
    log(f"\n=== XLA dump of {impl}'s step on layout {layout}: "
        f"benchmarks/xla_fusions.py {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log(proc.stdout[-2000:], proc.stderr[-2000:])
        return {"status": f"error (exit {proc.returncode})"}
    with open(out) as f:
        res = json.load(f)
    res["analysis_s"] = time.perf_counter() - t0
    log("  " + res.get("summary", ""))
    return res


def write_report(data, out_dir):
    """Writes results.md and results.png; prints the table."""
    md = markdown(data)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    png = os.path.join(out_dir, "results.png")
    try:
        chart(data, png)
    except Exception as e:  # pylint: disable=broad-except
        log(f"chart failed: {type(e).__name__}: {e}")
    log("\n" + md)
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="output directory (JSON, Markdown table, PNG)")
    p.add_argument("--layouts", default="A,B,C",
                   help="A: 1 x 4096x4096; B: 256 vars, 16.9M params "
                        "(transformer-like); C: 200 vars, 0.2M params")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20,
                   help="timed steps per implementation per round")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps after the first call")
    p.add_argument("--pause", type=float, default=0.05,
                   help="seconds of idle before each implementation's turn")
    p.add_argument("--only", default="",
                   help="comma-separated implementation keys to run "
                        "(default: all); keys: "
                        + ",".join(c.key for c in IMPLS))
    p.add_argument("--skip", default="", help="implementation keys to skip")
    p.add_argument("--all", action="store_true",
                   help="also run the extras: " + ",".join(sorted(EXTRAS)))
    p.add_argument("--no-hlo", action="store_true",
                   help="skip the XLA dump analysis of our step")
    p.add_argument("--hlo-layouts", default="B",
                   help="layouts whose compiled step is dumped and analysed")
    p.add_argument("--hlo-impls", default="ours",
                   help="whose compiled step to analyse: ours,keras_xla,optax")
    p.add_argument("--memory", choices=["inprocess", "subprocess"],
                   default="inprocess",
                   help="subprocess: also measure each implementation's "
                        "peak memory alone in a fresh process (slower)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--from-json",
                   help="only re-render results.md and results.png from "
                        "this results.json (into --out)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 rounds x 3 steps, 1 warm-up")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 3, 1
    if args.memory_child:
        memory_child(args.memory_child, args.layouts, args)
        return
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        write_report(data, args.out)
        return
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    available, import_errors = set(), {}
    for mod in ("tensorflow", "tf_adamw", "keras", "tf_keras", "torch", "jax",
                "optax"):
        m, err = try_import(mod)
        if m is not None:
            available.add(mod)
        else:
            import_errors[mod] = err
    for mod, err in import_errors.items():
        log(f"{mod}: not installed ({err})")
    if "torch" in available:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
    warm_up_runtimes(available)

    only = set(filter(None, args.only.split(",")))
    skip = set(filter(None, args.skip.split(",")))
    if not args.all and not only:
        skip |= EXTRAS
    impls = [c for c in IMPLS
             if (not only or c.key in only) and c.key not in skip]
    warmup_s = warm_up_impls(impls, available)
    layouts = {}
    for name in filter(None, args.layouts.split(",")):
        layouts[name] = run_layout(name.strip(), impls, available, args)

    data = {
        "meta": {
            "command": " ".join([os.path.relpath(sys.argv[0])]
                                + (argv if argv is not None
                                   else sys.argv[1:])),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host_cpu": cpu_model(), "nproc": os.cpu_count(),
            "versions": versions(), "import_errors": import_errors,
            "git": git_state(),
            "rounds": args.rounds, "steps": args.steps,
            "warmup": args.warmup, "pause_s": args.pause,
            "bytes_per_param": BYTES_PER_PARAM, "dtype": "float32",
            "hyperparameters": {"learning_rate": LR, "weight_decay": WD,
                                "beta_1": B1, "beta_2": B2, "epsilon": EPS},
            "loadavg_start": load_start,
            "process_warmup_s": warmup_s,
            "memory_method": (
                "Linux VmRSS/VmHWM from /proc/self/status; VmHWM reset via "
                "/proc/self/clear_refs before each phase. first-call peak = "
                "HWM during optimizer creation+build+first step minus RSS "
                "before it (parameters already allocated); step peak = max "
                "over rounds of HWM during the round's steps minus RSS before "
                "the round. Allocator reuse of memory freed earlier in the "
                "process can make a delta smaller than the true footprint."),
        },
        "layouts": layouts,
    }
    data["targets"] = targets(layouts)
    if not args.no_hlo and "tensorflow" in available:
        data["xla_fusions"] = {}
        for impl in filter(None, args.hlo_impls.split(",")):
            for lay in filter(None, args.hlo_layouts.split(",")):
                data["xla_fusions"][f"{impl}/{lay}"] = hlo_analysis(
                    lay, impl, args.out)
    data["meta"]["loadavg_end"] = os.getloadavg()
    data["meta"]["wall_s"] = time.perf_counter() - t_start

    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    png = write_report(data, args.out)
    log(f"wrote {json_path}, {png}; wall {data['meta']['wall_s']:.0f} s; "
        f"load average start {load_start[0]:.1f}, end "
        f"{data['meta']['loadavg_end'][0]:.1f}")


if __name__ == "__main__":
    main()
