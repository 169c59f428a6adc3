#!/usr/bin/env python3
"""Where one bench_many.py configuration's first call goes (own process).

    python benchmarks/many_diag.py KEY N [--no-grappler] [--hlo] [--profile]
        [--shapes cycle|distinct] [--save DIR]

Prints one JSON line: build, Python trace (`get_concrete_function`), first
run, median step, the traced ops per type (per variable), and:
  --no-grappler  with `disable_meta_optimizer` (grappler's share of the
                 first run is the difference from a run without it);
  --hlo          (jit_compile configurations) the time of
                 `experimental_get_compiler_ir()(stage=...)` for "hlo"
                 (tf2xla alone) and "optimized_hlo", with their instruction
                 counts per variable (texts saved under --save);
  --profile      a cProfile of the trace, saved under --save.
"""
import argparse, json, os, sys, time, re, collections
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
p = argparse.ArgumentParser()
p.add_argument("key"); p.add_argument("n", type=int)
p.add_argument("--no-grappler", action="store_true")
p.add_argument("--hlo", action="store_true")
p.add_argument("--profile", action="store_true")
p.add_argument("--shapes", choices=["cycle", "distinct"], default="cycle")
p.add_argument("--save", default="/tmp/many_diag")
a = p.parse_args()
import tensorflow as tf
import keras
import bench_many as bm, bench_adamw as ba
if a.no_grappler:
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
cfg = bm.CONFIGS[a.key]
# warm-up as the benchmark does
tiny = bm.Run(cfg, [(8, 8), (8,)], seed=1); tiny.first(); tiny.step(); del tiny
run = bm.Run(cfg, ba.many_shapes(a.n, a.shapes == "distinct"))
os.makedirs(a.save, exist_ok=True)
out = {"key": a.key, "n": a.n, "no_grappler": a.no_grappler}
t0 = time.perf_counter()
opt = run.opt = run._optimizer(); opt.build(run.vars)
t1 = time.perf_counter()
grads, variables = run.grads, run.vars
keras_impl = cfg["impl"] == "keras"
@tf.function(jit_compile=cfg["user_jit"])
def train_step():
    opt.apply_gradients(zip(grads, variables))
    it = opt.iterations
    return tf.identity(it.value if keras_impl else it)
if a.profile:
    import cProfile, pstats
    pr = cProfile.Profile(); pr.enable()
conc = train_step.get_concrete_function()
t2 = time.perf_counter()
if a.profile:
    pr.disable()
    st = pstats.Stats(pr); st.sort_stats("cumulative")
    import io
    s = io.StringIO(); st.stream = s; st.print_stats(45)
    open(os.path.join(a.save, f"prof_{a.key}_{a.n}.txt"), "w").write(s.getvalue())
    st.sort_stats("tottime"); s = io.StringIO(); st.stream = s; st.print_stats(30)
    open(os.path.join(a.save, f"prof_{a.key}_{a.n}.txt"), "a").write(s.getvalue())
out.update(build_s=t1 - t0, trace_s=t2 - t1)
if a.hlo and cfg["user_jit"]:
    gen = train_step.experimental_get_compiler_ir()
    for stage in ("hlo", "optimized_hlo"):
        t = time.perf_counter(); txt = gen(stage=stage); dt = time.perf_counter() - t
        n_instr = len(re.findall(r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*\S", txt, re.M))
        ops = collections.Counter(re.findall(r"=\s*(?:\([^=]*?\)|\S+)\s+([a-z][\w\-]*)\(", txt))
        out[f"{stage}_s"] = dt; out[f"{stage}_instr"] = n_instr
        out[f"{stage}_instr_per_var"] = n_instr / a.n
        out[f"{stage}_top"] = dict(ops.most_common(15))
        out[f"{stage}_computations"] = len(re.findall(r"^\S.*\{\s*$", txt, re.M))
        open(os.path.join(a.save, f"{a.key}_{a.n}_{stage}.txt"), "w").write(txt)
t = time.perf_counter(); train_step().numpy(); t3 = time.perf_counter()
out["first_run_s"] = t3 - t
ts = []
for _ in range(20):
    t = time.perf_counter(); train_step().numpy(); ts.append(time.perf_counter() - t)
out["step_ms"] = 1e3 * float(np.median(ts))
c = bm.count_ops(conc)
out.update({k: c[k] for k in ("ops_main", "ops_library", "n_library_functions")})
out["ops_by_type_per_var"] = {k: round(v / a.n, 2) for k, v in c["ops_by_type"].items() if v >= a.n / 10}
out["ops_by_type_small"] = {k: v for k, v in c["ops_by_type"].items() if v < a.n / 10}
import resource
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
