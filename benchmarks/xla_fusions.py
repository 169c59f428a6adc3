#!/usr/bin/env python3
"""How XLA compiled one AdamW step: fusions per variable, bytes per param.

Runs one step of an implementation with `XLA_FLAGS=--xla_dump_to=DIR
--xla_dump_hlo_as_text` (so it must be its own process: XLA reads the flags
once), then reads the optimized HLO module of the step and counts, in the
entry computation, the fusions (and other array ops) and the bytes each one
reads and writes: the sum is the memory traffic of the compiled step if no
intermediate stays in cache. 28 B/param is the single-pass minimum.

    python benchmarks/xla_fusions.py --layout B [--impl ours|keras_xla|optax]
        [--json OUT.json] [--keep-dump DIR]
    python benchmarks/xla_fusions.py --layout many --ema-clip   # issue #13
"""

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

_ITEMSIZE = {"f32": 4, "f64": 8, "f16": 2, "bf16": 2, "s64": 8, "u64": 8,
             "s32": 4, "u32": 4, "s16": 2, "u16": 2, "s8": 1, "u8": 1,
             "pred": 1}
_FREE_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast",
             "after-all", "partition-id", "replica-id"}


def shape_arrays(shape):
    """[(dtype, n_elements)] of every array in an HLO shape string."""
    out = []
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append((dtype, n, bool(dims)))
    return out


def shape_bytes(shape):
    return sum(_ITEMSIZE.get(d, 4) * n for d, n, _ in shape_arrays(shape))


def is_array(shape):
    return any(nonscalar for _, _, nonscalar in shape_arrays(shape))


def _matching(text, start):
    """Index of the parenthesis closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def parse_entry(hlo):
    """The entry computation's instructions: name, shape, opcode, operands."""
    m = re.search(r"^ENTRY [^\n]*\{\n(.*?)^\}", hlo, re.S | re.M)
    if not m:
        raise ValueError("no ENTRY computation found")
    instrs = []
    for line in m.group(1).splitlines():
        im = re.match(r"\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$", line)
        if not im:
            continue
        name, rest = im.group(1), im.group(2)
        if rest.startswith("("):
            end = _matching(rest, 0)
            shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
        else:
            shape, _, rest = rest.partition(" ")
        om = re.match(r"([\w\-]+)\(", rest)
        if not om:
            continue
        opcode = om.group(1)
        close = _matching(rest, om.end() - 1)
        operands = re.findall(r"%([^\s,()]+)", rest[om.end():close])
        kind = re.search(r"kind=(\w+)", rest)
        instrs.append({"name": name, "shape": shape, "opcode": opcode,
                       "operands": operands,
                       "kind": kind.group(1) if kind else None})
    return instrs


def analyse(hlo, n_params, n_vars):
    instrs = parse_entry(hlo)
    shapes = {i["name"]: i["shape"] for i in instrs}
    alias = re.search(r"input_output_alias=\{(.*?)\}\s*,\s*\w+=", hlo)
    n_alias = len(re.findall(r"may-alias|must-alias", alias.group(1))) if (
        alias) else 0
    ops = []
    for i in instrs:
        if i["opcode"] in _FREE_OPS:
            continue
        read = sum(shape_bytes(shapes.get(o, "")) for o in set(i["operands"]))
        write = shape_bytes(i["shape"])
        ops.append(dict(i, read=read, write=write))
    array_ops = [o for o in ops if is_array(o["shape"])]
    fusions = [o for o in array_ops if o["opcode"] == "fusion"]
    multi = [o for o in fusions if o["shape"].startswith("(")]
    copies = [o for o in array_ops if o["opcode"] == "copy"]
    traffic = sum(o["read"] + o["write"] for o in array_ops)
    kinds = {}
    for o in fusions:
        kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
    others = {}
    for o in array_ops:
        if o["opcode"] != "fusion":
            others[o["opcode"]] = others.get(o["opcode"], 0) + 1
    res = {
        "n_params": n_params, "n_vars": n_vars,
        "entry_instructions": len(instrs),
        "array_fusions": len(fusions),
        "array_fusions_per_variable": len(fusions) / n_vars,
        "multi_output_fusions": len(multi),
        "fusion_kinds": kinds,
        "array_copies": len(copies),
        "other_array_ops": others,
        "scalar_ops": len(ops) - len(array_ops),
        "input_output_aliases": n_alias,
        "est_bytes_moved": traffic,
        "est_bytes_per_param": traffic / n_params,
    }
    res["summary"] = (
        f"{len(fusions)} array fusions for {n_vars} variables "
        f"({len(fusions) / n_vars:.2f} per variable; {len(multi)} "
        f"multi-output; kinds {kinds}), {len(copies)} array copies, other "
        f"array ops {others or 'none'}; {n_alias} input/output aliases "
        f"(in-place updates); estimated traffic {traffic / n_params:.1f} "
        "B/param if nothing stays in cache (single pass: 28)")
    return res


def run_step(impl, layout, dump_dir, ema_clip=False):
    """Runs one step of `impl` on `layout` with XLA dumping to `dump_dir`."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text").strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    sys.path.insert(0, HERE)
    import numpy as np
    from bench_adamw import (B1, B2, EPS, LR, WD, layout_shapes)
    shapes, _ = layout_shapes(layout)
    # The `many` layout's settings (bench_many.py): EMA + global clipping.
    extra = {"use_ema": True, "global_clipnorm": 1.0} if ema_clip else {}
    rng = np.random.default_rng(0)
    init = [(0.02 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    grads = [(1e-3 * rng.standard_normal(s)).astype(np.float32)
             for s in shapes]
    if impl == "ours":
        import tensorflow as tf
        import tf_adamw
        variables = [tf.Variable(x) for x in init]
        # fused=False: the XLA step (what TPUs and GPUs run); on CPU the
        # default step is the fused kernel, which XLA does not compile.
        opt = tf_adamw.AdamW(learning_rate=LR, weight_decay=WD, beta_1=B1,
                             beta_2=B2, epsilon=EPS, fused=False, **extra)
        opt.apply([tf.constant(g) for g in grads], variables).numpy()
        # The step's tf.function: `adamw_step` (tf_adamw.step_kinds;
        # `update_step` before the layered redesign).
        pattern = "*_step*cpu_after_optimizations.txt"
    elif impl == "keras_xla":
        import keras
        import tensorflow as tf
        variables = [keras.Variable(x) for x in init]
        tgrads = [tf.constant(g) for g in grads]
        opt = keras.optimizers.AdamW(learning_rate=LR, weight_decay=WD,
                                     beta_1=B1, beta_2=B2, epsilon=EPS,
                                     **extra)
        opt.build(variables)

        @tf.function(jit_compile=True)
        def keras_step():
            opt.apply_gradients(zip(tgrads, variables))
            return tf.identity(opt.iterations.value)
        keras_step().numpy()
        pattern = "*keras_step*cpu_after_optimizations.txt"
    elif impl == "optax":
        import jax
        import jax.numpy as jnp
        import optax
        tx = optax.adamw(learning_rate=LR, b1=B1, b2=B2, eps=EPS,
                         weight_decay=WD)
        params = [jnp.asarray(x) for x in init]
        state = tx.init(params)

        def optax_step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state
        out = jax.jit(optax_step, donate_argnums=(0, 1))(
            params, state, [jnp.asarray(g) for g in grads])
        jax.block_until_ready(out)
        pattern = "*optax_step*after_optimizations.txt"
    else:
        raise ValueError(f"unknown impl {impl!r}")
    files = [f for f in glob.glob(os.path.join(dump_dir, pattern))
             if not re.search(r"after_optimizations-", f)]
    if not files:
        raise FileNotFoundError(f"no {pattern} in {dump_dir}")
    path = max(files, key=os.path.getsize)
    n_params = int(sum(np.prod(s) for s in shapes))
    return path, n_params, len(shapes)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="B")
    p.add_argument("--impl", default="ours",
                   choices=["ours", "keras_xla", "optax"])
    p.add_argument("--json", help="write the analysis here")
    p.add_argument("--keep-dump", help="dump into this directory and keep it")
    p.add_argument("--ema-clip", action="store_true",
                   help="use_ema=True, global_clipnorm=1.0 (ours, keras_xla)")
    args = p.parse_args()
    dump = args.keep_dump or tempfile.mkdtemp(prefix="xla_dump_")
    os.makedirs(dump, exist_ok=True)
    try:
        path, n_params, n_vars = run_step(args.impl, args.layout, dump,
                                          args.ema_clip)
        with open(path) as f:
            hlo = f.read()
        res = analyse(hlo, n_params, n_vars)
        res.update({"impl": args.impl, "layout": args.layout,
                    "ema_clip": args.ema_clip,
                    "module": os.path.basename(path)})
    finally:
        if not args.keep_dump:
            shutil.rmtree(dump, ignore_errors=True)
    print(res["summary"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
