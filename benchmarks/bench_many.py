#!/usr/bin/env python3
"""The `many` layout: AdamW on many small variables, with EMA and clipping.

Issue #13's benchmark: 100 / 1,000 / 4,000 small variables (~298 params
each, `bench_adamw.many_shapes`), `use_ema=True, global_clipnorm=1.0`,
each configuration measured ALONE IN A FRESH CHILD PROCESS (so its peak
RSS and its compile caches are its own):

- first call: create the optimizer, build it, trace the user's
  `tf.function`, compile it (grappler or XLA) and run it once; reported
  split into build / trace / first run (the first run holds grappler's
  rewrite or the XLA compilation);
- step: median (and mean) of `--steps` timed calls after `--warmup`
  untimed ones, each synchronised by `.numpy()` on the returned scalar;
- memory: the child's `ru_maxrss` (whole process, TF's runtime included),
  the RSS high-water mark during the first call (reset through
  /proc/self/clear_refs before it) and its increase over the RSS before;
- graph size: the ops of the traced function and of every function in its
  library (nested steps, tf.cond branches), in total and per variable.

Before the measured first call every child runs the same configuration
once on a 2-variable model, so one-time library start-up (XLA/LLVM,
autograph's conversion of library code, the kernel's loading) is charged
to no configuration (`warmup_s` in the JSON).

    python benchmarks/bench_many.py --out DIR [--vars 100,1000,4000]
        [--configs KEY,...] [--steps N] [--quick] [--repeats R]

`bash benchmarks/run.sh` runs it (into benchmarks/results/, or
benchmarks/results/quick/ with --quick). A configuration whose first call,
extrapolated linearly from the previous variable count, would exceed
`--budget` seconds (or whose first-call RSS would exceed `--max-rss-gb`)
is skipped at the larger count and marked so.
"""

import argparse
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_adamw as ba  # noqa: E402  pylint: disable=wrong-import-position

EMA_CLIP = {"use_ema": True, "global_clipnorm": 1.0}


def _config(impl, label, fused=None, jit=False, options=None, extra=False):
    return {"impl": impl, "label": label, "fused": fused, "user_jit": jit,
            "options": dict(options or {}), "extra": extra}


# key -> what runs. `user_jit`: the user's function is
# tf.function(jit_compile=True); otherwise a plain tf.function.
CONFIGS = {
    # tf_adamw, default fused=None: the fused CPU kernel for decay + Adam.
    "fused_bare": _config("ours", "ours, fused kernel, tf.function, bare"),
    "fused_ema_clip": _config(
        "ours", "ours, fused kernel, tf.function, EMA + clip",
        options=EMA_CLIP),
    "fused_ema_clip_acc4": _config(
        "ours", "ours, fused kernel, tf.function, EMA + clip + accum 4",
        options=dict(EMA_CLIP, gradient_accumulation_steps=4)),
    "fused_ema_clip_skip": _config(
        "ours", "ours, fused kernel, tf.function, EMA + clip + skip_nonfinite",
        options=dict(EMA_CLIP, skip_nonfinite_gradients=True)),
    "fused_packed_ema_clip": _config(
        "ours", "ours, fused kernel, tf.function, EMA + clip, packed slots",
        options=dict(EMA_CLIP, slot_layout="packed"), extra=True),
    # One optional stage at a time (--configs all): the cost of each.
    "fused_ema": _config("ours", "ours, fused kernel, tf.function, EMA",
                         options={"use_ema": True}, extra=True),
    "fused_clip": _config(
        "ours", "ours, fused kernel, tf.function, global clip",
        options={"global_clipnorm": 1.0}, extra=True),
    # fused=False: its own XLA-compiled step, called from a plain
    # tf.function.
    "nofused_bare": _config(
        "ours", "ours, fused=False (own XLA step), tf.function, bare",
        fused=False, extra=True),
    "nofused_ema_clip": _config(
        "ours", "ours, fused=False (own XLA step), tf.function, EMA + clip",
        fused=False, options=EMA_CLIP),
    # The TPU/GPU form: the whole step under the user's jit_compile=True.
    "userxla_bare": _config(
        "ours", "ours, in user tf.function(jit_compile=True), bare",
        jit=True),
    "userxla_ema_clip": _config(
        "ours", "ours, in user tf.function(jit_compile=True), EMA + clip",
        jit=True, options=EMA_CLIP),
    "userxla_ema": _config(
        "ours", "ours, in user tf.function(jit_compile=True), EMA",
        jit=True, options={"use_ema": True}, extra=True),
    "userxla_clip": _config(
        "ours", "ours, in user tf.function(jit_compile=True), global clip",
        jit=True, options={"global_clipnorm": 1.0}, extra=True),
    # The same with packed slots (slot_layout="packed"): each variable's
    # momentum, velocity and average are the rows of one variable.
    "userxla_packed_ema_clip": _config(
        "ours", "ours, in user jit_compile=True, EMA + clip, packed slots",
        jit=True, options=dict(EMA_CLIP, slot_layout="packed")),
    "userxla_packed_ema_clip_acc4": _config(
        "ours", "ours, in user jit_compile=True, EMA + clip + accum 4, "
        "packed slots", jit=True,
        options=dict(EMA_CLIP, gradient_accumulation_steps=4,
                     slot_layout="packed"), extra=True),
    "userxla_packed_ema_clip_skip": _config(
        "ours", "ours, in user jit_compile=True, EMA + clip + "
        "skip_nonfinite, packed slots", jit=True,
        options=dict(EMA_CLIP, skip_nonfinite_gradients=True,
                     slot_layout="packed"), extra=True),
    "userxla_ema_clip_acc4": _config(
        "ours", "ours, in user jit_compile=True, EMA + clip + accum 4",
        jit=True, options=dict(EMA_CLIP, gradient_accumulation_steps=4)),
    "userxla_ema_clip_skip": _config(
        "ours", "ours, in user jit_compile=True, EMA + clip + skip_nonfinite",
        jit=True, options=dict(EMA_CLIP, skip_nonfinite_gradients=True)),
    # Keras 3's AdamW, same settings.
    "keras_xla_bare": _config(
        "keras", "Keras 3 AdamW, tf.function(jit_compile=True), bare",
        jit=True, extra=True),
    "keras_xla_ema_clip": _config(
        "keras", "Keras 3 AdamW, tf.function(jit_compile=True), EMA + clip",
        jit=True, options=EMA_CLIP),
    "keras_graph_ema_clip": _config(
        "keras", "Keras 3 AdamW, tf.function (graph), EMA + clip",
        options=EMA_CLIP),
    # No optimizer: the least a jit_compile=True step can cost that writes
    # k buffers per variable (`b.assign_add(g)` for each), the variable and
    # k - 1 state buffers of its shape. 4 is AdamW with EMA as both
    # optimizers keep it (parameter, m, v, average); 2 would be the
    # parameter and one buffer holding all its state.
    "xla_floor_4buffers": _config(
        "floor", "no optimizer: jit_compile=True, 4 buffers/var written",
        jit=True, options={"buffers": 4}),
    "xla_floor_2buffers": _config(
        "floor", "no optimizer: jit_compile=True, 2 buffers/var written",
        jit=True, options={"buffers": 2}, extra=True),
}
DEFAULT_CONFIGS = [k for k, c in CONFIGS.items() if not c["extra"]]


# ---------------------------------------------------------------------------
# The child: one configuration, one variable count, in a fresh process.

class _Floor:
    """The `floor` configurations' stand-in for an optimizer: each buffer
    of each variable gets the variable's gradient added."""

    def __init__(self, buffers):
        import tensorflow as tf
        self.buffers = buffers
        self.iterations = tf.Variable(0, dtype=tf.int64)

    def build(self, variables):
        del variables

    def apply_gradients(self, grads_and_vars):
        for (grad, _), buffers in zip(grads_and_vars, self.buffers):
            for buffer in buffers:
                buffer.assign_add(grad, read_value=False)
        self.iterations.assign_add(1, read_value=False)


class Run:
    """One configuration on one model: `first()` then `step()`."""

    def __init__(self, config, shapes, seed=0):
        import tensorflow as tf
        self.config = config
        rng = np.random.default_rng(seed)
        init = [(0.02 * rng.standard_normal(s)).astype(np.float32)
                for s in shapes]
        self.grads = [tf.constant((1e-3 * rng.standard_normal(s)).astype(
            np.float32)) for s in shapes]
        if config["impl"] == "keras":
            import keras
            self.vars = [keras.Variable(x, dtype="float32") for x in init]
        else:
            self.vars = [tf.Variable(x) for x in init]
        if config["impl"] == "floor":
            self.buffers = [[v] + [tf.Variable(tf.zeros_like(v)) for _ in
                                   range(config["options"]["buffers"] - 1)]
                            for v in self.vars]
        self.times = {}

    def _optimizer(self):
        if self.config["impl"] == "floor":
            return _Floor(self.buffers)
        hyper = {"learning_rate": ba.LR, "weight_decay": ba.WD,
                 "beta_1": ba.B1, "beta_2": ba.B2, "epsilon": ba.EPS}
        options = self.config["options"]
        if self.config["impl"] == "keras":
            import keras
            return keras.optimizers.AdamW(**hyper, **options)
        import tf_adamw
        return tf_adamw.AdamW(**hyper, fused=self.config["fused"], **options)

    def first(self):
        """Times create + build, trace, first run (compile + run)."""
        import tensorflow as tf
        t0 = time.perf_counter()
        opt = self.opt = self._optimizer()
        opt.build(self.vars)
        t1 = time.perf_counter()
        grads, variables = self.grads, self.vars
        keras = self.config["impl"] == "keras"

        @tf.function(jit_compile=self.config["user_jit"])
        def train_step():
            opt.apply_gradients(zip(grads, variables))
            it = opt.iterations
            return tf.identity(it.value if keras else it)
        self.fn = train_step
        self.concrete = train_step.get_concrete_function()
        t2 = time.perf_counter()
        self.step()
        t3 = time.perf_counter()
        self.times = {"build_s": t1 - t0, "trace_s": t2 - t1,
                      "first_run_s": t3 - t2, "first_call_s": t3 - t0}
        if self.config["impl"] == "ours":
            self.times["uses_fused_kernel"] = bool(opt.uses_fused_kernel)

    def step(self):
        return self.fn().numpy()


def count_ops(concrete):
    """Ops of the traced function and of every function in its library."""
    gdef = concrete.graph.as_graph_def()
    by_type = {}
    n_main = len(gdef.node)
    for node in gdef.node:
        by_type[node.op] = by_type.get(node.op, 0) + 1
    n_lib = 0
    for fdef in gdef.library.function:
        for node in fdef.node_def:
            by_type[node.op] = by_type.get(node.op, 0) + 1
            n_lib += 1
    return {"ops_main": n_main, "ops_library": n_lib,
            "n_library_functions": len(gdef.library.function),
            "ops_by_type": dict(sorted(by_type.items(),
                                       key=lambda kv: -kv[1]))}


def child(key, n_vars, steps, warmup, count, distinct=False):
    """Measures `key` on `n_vars` variables; prints one JSON line."""
    config = CONFIGS[key]
    ba.set_mmap_threshold(ba.MEASURE_MMAP_THRESHOLD)
    import tensorflow as tf  # noqa: F401
    import keras  # noqa: F401
    if config["impl"] == "ours":
        from tf_adamw import kernels
        kernels.load()
    out = {"key": key, "n_vars": n_vars, "rss_after_import_mb":
           ba.rss_bytes() / 2**20}
    # One-time start-up, on a 2-variable model of the same configuration.
    t0 = time.perf_counter()
    tiny = Run(config, [(8, 8), (8,)], seed=1)
    tiny.first()
    tiny.step()
    out["warmup_s"] = time.perf_counter() - t0
    del tiny
    gc.collect()

    shapes = ba.many_shapes(n_vars, distinct)
    out["n_distinct_shapes"] = len(set(shapes))
    out["n_params"] = int(sum(int(np.prod(s)) for s in shapes))
    run = Run(config, shapes)
    gc.collect()
    rss0 = ba.rss_bytes()
    can_reset = ba.reset_hwm()
    run.first()
    if can_reset:
        hwm = ba.hwm_bytes()
        out["first_call_hwm_mb"] = hwm / 2**20
        out["first_call_delta_mb"] = (hwm - rss0) / 2**20
    out["rss_before_first_call_mb"] = rss0 / 2**20
    out.update(run.times)
    ba.set_mmap_threshold(ba.TIMING_MMAP_THRESHOLD)
    acc = config["options"].get("gradient_accumulation_steps") or 1
    # Whole accumulation cycles: the timed calls hold steps/acc updates.
    steps = max(acc, steps - steps % acc)
    warmup = warmup + (-(1 + warmup)) % acc  # timing starts a new cycle
    for _ in range(warmup):
        run.step()
    times = []
    gc.disable()
    try:
        for _ in range(steps):
            t = time.perf_counter()
            run.step()
            times.append(time.perf_counter() - t)
    finally:
        gc.enable()
    ms = np.asarray(times) * 1e3
    out.update({"steps": steps, "median_ms": float(np.median(ms)),
                "mean_ms": float(np.mean(ms)), "min_ms": float(ms.min()),
                "p25_ms": float(np.percentile(ms, 25)),
                "p75_ms": float(np.percentile(ms, 75))})
    if acc > 1:
        # Per applied update: the mean of whole cycles, times the cycle.
        out["mean_per_update_ms"] = float(np.mean(ms)) * acc
    out["peak_rss_mb"] = resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024
    if count:
        t = time.perf_counter()
        out.update(count_ops(run.concrete))
        out["ops_per_var"] = (out["ops_main"] + out["ops_library"]) / n_vars
        out["count_s"] = time.perf_counter() - t
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------
# The parent.

def log(*args):
    print(*args, flush=True)


def _child_rss_gb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def run_child(key, n_vars, args):
    """Runs one child; kills it past --timeout or --max-rss-gb (the
    machine is shared: a compilation that grows without bound must not
    take it down)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", key,
           "--vars", str(n_vars), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--shapes", args.shapes]
    if args.no_count:
        cmd.append("--no-count")
    t0 = time.perf_counter()
    killed = None
    peak_gb = 0.0
    import tempfile
    with tempfile.TemporaryFile("w+") as errfile, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile,
                             text=True) as proc:
        import threading
        chunks = []
        reader = threading.Thread(
            target=lambda: chunks.append(proc.stdout.read()), daemon=True)
        reader.start()
        while proc.poll() is None:
            time.sleep(0.5)
            rss = _child_rss_gb(proc.pid)
            if rss is not None:
                peak_gb = max(peak_gb, rss)
            elapsed = time.perf_counter() - t0
            if elapsed > args.timeout:
                killed = f"killed: still running after {elapsed:.0f} s"
            elif rss is not None and rss > args.max_rss_gb:
                killed = (f"killed: RSS {rss:.1f} GB > --max-rss-gb "
                          f"{args.max_rss_gb:g} after {elapsed:.0f} s")
            if killed:
                proc.kill()
                break
        proc.wait()
        reader.join(timeout=10)
        errfile.seek(0)
        stderr = errfile.read()[-1500:]
    wall = time.perf_counter() - t0
    if killed:
        return {"status": killed, "child_wall_s": wall,
                "child_peak_rss_gb_sampled": peak_gb}
    stdout = "".join(chunks)
    for line in stdout.splitlines()[::-1]:
        if line.startswith("{"):
            res = json.loads(line)
            res["status"] = "ok"
            res["child_wall_s"] = wall
            return res
    return {"status": f"error (exit {proc.returncode})",
            "error": (stderr or stdout)[-1500:]}


def predicted_skip(key, n_vars, results, args):
    """Why `key` is skipped at `n_vars`, from its result at a smaller
    count (linear extrapolation: a lower bound for superlinear costs)."""
    smaller = [(n, r) for (k, n), r in results.items()
               if k == key and n < n_vars and r.get("status") == "ok"]
    if not smaller:
        failed = [n for (k, n), r in results.items()
                  if k == key and n < n_vars and r.get("status") != "ok"]
        return (f"skipped: failed or skipped at {max(failed)} variables"
                if failed else None)
    n, r = max(smaller, key=lambda nr: nr[0])
    scale = n_vars / n
    fc = r["first_call_s"] * scale
    if fc > args.budget:
        return (f"skipped: first call predicted >= {fc:.0f} s "
                f"(linear from {r['first_call_s']:.1f} s at {n}; "
                f"--budget {args.budget:.0f})")
    delta = r.get("first_call_delta_mb")
    if delta is not None:
        rss = (r["rss_before_first_call_mb"] + delta * scale) / 1024
        if rss > args.max_rss_gb:
            return (f"skipped: first-call RSS predicted >= {rss:.1f} GB "
                    f"(--max-rss-gb {args.max_rss_gb:g})")
    return None


def _origin(module):
    import importlib.util
    spec = importlib.util.find_spec(module)
    return None if spec is None else spec.origin


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def goals(by_key):
    """Issue #13's goals at one variable count: {name: (value, target,
    met or None)}."""
    def get(key, field):
        r = by_key.get(key) or {}
        return r.get(field) if r.get("status") == "ok" else None

    out = {}
    v = get("fused_ema_clip", "first_call_s")
    out["1. fused EMA+clip: first call"] = (v, "<= 3 s", None if v is None
                                           else v <= 3.0, "s")
    v = ratio(get("fused_ema_clip", "median_ms"),
              get("fused_bare", "median_ms"))
    out["1. fused EMA+clip step / fused bare step"] = (
        v, "<= 1.5x", None if v is None else v <= 1.5, "x")
    for key, what in (("userxla_ema_clip", "user-XLA"),
                      ("userxla_packed_ema_clip", "user-XLA, packed slots")):
        v = ratio(get(key, "first_call_s"),
                  get("keras_xla_ema_clip", "first_call_s"))
        out[f"2. {what} first call / Keras 3 XLA's"] = (
            v, "<= 0.25x", None if v is None else v <= 0.25, "x")
        v = ratio(get(key, "median_ms"),
                  get("keras_xla_ema_clip", "median_ms"))
        out[f"2. {what} step / Keras 3 XLA's"] = (
            v, "<= 0.5x", None if v is None else v <= 0.5, "x")
    for k in (4, 2):
        out[f"2. floor: {k} buffers/var written, no math: step / Keras "
            "3 XLA's"] = (ratio(get(f"xla_floor_{k}buffers", "median_ms"),
                                get("keras_xla_ema_clip", "median_ms")),
                          "the least a step of k buffers/var costs", None,
                          "x")
    for key, what in (("userxla_ema_clip", "user-XLA"),
                      ("userxla_packed_ema_clip", "user-XLA, packed slots")):
        v = get(key, "first_call_hwm_mb")
        v = None if v is None else v / 1024
        out[f"2. {what} first-call peak RSS (absolute)"] = (
            v, "<= 1.5 GB", None if v is None else v <= 1.5, "GB")
    for path in ("fused", "userxla", "userxla_packed"):
        base = get(f"{path}_ema_clip", "mean_ms")
        acc = get(f"{path}_ema_clip_acc4", "mean_per_update_ms")
        skip = get(f"{path}_ema_clip_skip", "mean_ms")
        out[f"3. {path}: accum 4, per call / EMA+clip step"] = (
            ratio(None if acc is None else acc / 4, base),
            "no per-variable cost", None, "x")
        out[f"3. {path}: skip_nonfinite step / EMA+clip step"] = (
            ratio(skip, base), "no per-variable cost", None, "x")
        out[f"3. {path}: skip_nonfinite first call / EMA+clip's"] = (
            ratio(get(f"{path}_ema_clip_skip", "first_call_s"),
                  get(f"{path}_ema_clip", "first_call_s")),
            "no per-variable cost", None, "x")
        out[f"3. {path}: accum 4 first call / EMA+clip's"] = (
            ratio(get(f"{path}_ema_clip_acc4", "first_call_s"),
                  get(f"{path}_ema_clip", "first_call_s")),
            "no per-variable cost", None, "x")
    return out


def markdown(data):
    meta = data["meta"]
    lines = [
        f"`{meta['command']}` — {meta['date']}, commit "
        f"{(meta['git'].get('commit') or '?')[:7]}"
        f"{' (tf_adamw/ has uncommitted changes)' if meta['git'].get('tf_adamw_uncommitted_changes') else ''}"
        f", {meta['nproc']} cores, load average {meta['loadavg_start'][0]:.1f}"
        f" at start, {meta['loadavg_end'][0]:.1f} at end, wall "
        f"{meta['wall_s']:.0f} s; {meta['steps']} timed steps after "
        f"{meta['warmup']} untimed; each row a fresh process.", ""]
    origin = meta.get("tf_adamw_origin") or ""
    if origin and not origin.startswith(os.path.dirname(HERE) + os.sep):
        lines.insert(1, f"tf_adamw imported from `{origin}` (not this "
                        "checkout).")
        lines.insert(2, "")
    results = data["results"]
    for n in data["vars"]:
        rows = [(k, results[f"{k}@{n}"]) for k in data["configs"]
                if f"{k}@{n}" in results]
        if not rows:
            continue
        n_params = next((r["n_params"] for _, r in rows if "n_params" in r),
                        None)
        n_shapes = next((r["n_distinct_shapes"] for _, r in rows
                         if "n_distinct_shapes" in r), None)
        lines.append(f"**{n} variables** ({fmt(n_params, ',')} params, "
                     f"{fmt(n_shapes, 'd')} distinct shapes)")
        lines.append("")
        lines.append("| config | first call s | build / trace / first run s "
                     "| median step ms | mean ms (per update) | first-call "
                     "peak RSS MB (Δ) | process peak RSS MB | graph ops / var |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for key, r in rows:
            if r.get("status") != "ok":
                lines.append(f"| `{key}` | {r.get('status')} |||||||")
                continue
            per_update = r.get("mean_per_update_ms")
            lines.append(
                f"| `{key}` | {r['first_call_s']:.2f} | "
                f"{r['build_s']:.2f} / {r['trace_s']:.2f} / "
                f"{r['first_run_s']:.2f} | {r['median_ms']:.2f} | "
                f"{r['mean_ms']:.2f}"
                + (f" ({per_update:.2f})" if per_update else "") + " | "
                f"{fmt(r.get('first_call_hwm_mb'), '.0f')} "
                f"({fmt(r.get('first_call_delta_mb'), '+.0f')}) | "
                f"{r['peak_rss_mb']:.0f} | "
                f"{fmt(r.get('ops_per_var'), '.1f')} |")
        lines.append("")
        g = goals({k: r for k, r in rows})
        if any(v[0] is not None for v in g.values()):
            lines.append(f"Goals of issue #13 at {n} variables:")
            lines.append("")
            lines.append("| goal | value | target |")
            lines.append("|---|---:|---|")
            for name, (value, target, met, unit) in g.items():
                if value is None:
                    continue
                mark = "" if met is None else (" ✅" if met else " ❌")
                lines.append(f"| {name} | {value:.2f}{unit}{mark} | "
                             f"{target} |")
            lines.append("")
    lines.append("Keys: " + "; ".join(f"`{k}`: {CONFIGS[k]['label']}"
                                      for k in data["configs"]) + ".")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="output directory (many.json, many.md; with "
                        "--shapes distinct many_distinct.*)")
    p.add_argument("--vars", default="100,1000,4000",
                   help="comma-separated variable counts")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma-separated keys (default: all but extras); "
                        "'all' for every key: " + ",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=40,
                   help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed steps after the first call")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh processes per (configuration, count); the "
                        "report keeps the run with the median first call "
                        "and lists all")
    p.add_argument("--budget", type=float, default=120.0,
                   help="skip a configuration at a larger count when its "
                        "first call, extrapolated linearly, exceeds this (s)")
    p.add_argument("--max-rss-gb", type=float, default=8.0,
                   help="kill a child whose RSS exceeds this (GB), and skip "
                        "a configuration whose first-call RSS, extrapolated, "
                        "would")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="kill a child after this many seconds")
    p.add_argument("--no-count", action="store_true",
                   help="do not count the traced graph's ops")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 8 timed steps, 1 warm-up, 100 "
                        "variables unless --vars is given")
    p.add_argument("--shapes", choices=["cycle", "distinct"],
                   default="cycle",
                   help="cycle: 10 shapes repeated (the `many` layout); "
                        "distinct: every variable a different 2-D shape of "
                        "~298 params (XLA compiles each distinct kernel "
                        "once: the worst case for compile time)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raw_argv = sys.argv[1:] if argv is None else argv
    if args.quick:
        args.steps, args.warmup = 8, 1
        if not any(a == "--vars" or a.startswith("--vars=")
                   for a in raw_argv):
            args.vars = "100"
    if args.child:
        child(args.child, int(args.vars), args.steps, args.warmup,
              not args.no_count, args.shapes == "distinct")
        return
    configs = (list(CONFIGS) if args.configs == "all"
               else [k.strip() for k in args.configs.split(",") if k.strip()])
    unknown = [k for k in configs if k not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    counts = sorted(int(n) for n in args.vars.split(","))
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    data = {"meta": {
        "command": " ".join(["benchmarks/bench_many.py"] + raw_argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host_cpu": ba.cpu_model(), "nproc": os.cpu_count(),
        "versions": ba.versions(), "git": ba.git_state(),
        # Where the children import tf_adamw from (PYTHONPATH can point
        # them at another checkout).
        "tf_adamw_origin": _origin("tf_adamw"),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "steps": args.steps, "warmup": args.warmup, "shapes": args.shapes,
        "repeats": args.repeats, "budget_s": args.budget,
        "loadavg_start": os.getloadavg(),
        "hyperparameters": {"learning_rate": ba.LR, "weight_decay": ba.WD,
                            "beta_1": ba.B1, "beta_2": ba.B2,
                            "epsilon": ba.EPS},
        "shapes_cycle": ba.MANY_CYCLE},
        "vars": counts, "configs": configs, "results": {}}
    results = {}
    stem = "many" if args.shapes == "cycle" else "many_distinct"
    json_path = os.path.join(args.out, stem + ".json")
    for n in counts:
        shapes = ba.many_shapes(n, args.shapes == "distinct")
        log(f"\n=== many layout ({args.shapes} shapes): {n} variables, "
            f"{len(set(shapes))} distinct shapes, "
            f"{sum(int(np.prod(s)) for s in shapes):,} params")
        for key in configs:
            why = predicted_skip(key, n, results, args)
            if why:
                res = {"status": why}
            else:
                runs = [run_child(key, n, args) for _ in range(args.repeats)]
                ok = [r for r in runs if r.get("status") == "ok"]
                if ok:
                    ok.sort(key=lambda r: r["first_call_s"])
                    res = dict(ok[len(ok) // 2])
                    if args.repeats > 1:
                        res["repeats"] = [
                            {k: r.get(k) for k in (
                                "first_call_s", "median_ms", "mean_ms",
                                "first_call_hwm_mb", "peak_rss_mb")}
                            for r in ok]
                else:
                    res = runs[0]
            results[(key, n)] = res
            if res.get("status") == "ok":
                log(f"  {key:24s} first call {res['first_call_s']:7.2f} s "
                    f"(build {res['build_s']:.2f}, trace {res['trace_s']:.2f},"
                    f" run {res['first_run_s']:.2f}); step "
                    f"{res['median_ms']:8.2f} ms; first-call RSS "
                    f"{res.get('first_call_hwm_mb') or 0:.0f} MB, peak "
                    f"{res['peak_rss_mb']:.0f} MB; "
                    f"{fmt(res.get('ops_per_var'), '.1f')} ops/var")
            else:
                log(f"  {key:24s} {res.get('status')} "
                    f"{res.get('error', '')[-600:]}")
            data["results"][f"{key}@{n}"] = res
            with open(json_path, "w") as f:
                json.dump(data, f, indent=1)
    data["meta"]["loadavg_end"] = os.getloadavg()
    data["meta"]["wall_s"] = time.perf_counter() - t_start
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    md = markdown(data)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md)
    log("\n" + md)
    log(f"wrote {json_path} and {stem}.md; wall "
        f"{data['meta']['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
