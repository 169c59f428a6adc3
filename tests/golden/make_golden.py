"""Writes the golden checkpoint `tests/golden/adamw_v1/` (run by hand, once).

    cd /work/main && .venv/bin/python tests/golden/make_golden.py

What it contains. A `tf.train.Checkpoint(model=model, optimizer=opt).save()`
of:

- `model`: a `tf.Module` with two float32 variables, attribute `kernel`
  (name "dense/kernel", 3x2) and attribute `bias` (name "dense/bias", 2),
  with the fixed initial values in `INITIAL`;
- `opt`: `tf_adamw.AdamW(**CONFIG)`: learning_rate=0.01, weight_decay=0.004,
  amsgrad=True, use_ema=True (ema_momentum=0.99), gradient_accumulation_steps
  =2 and the other defaults;
- after `opt.apply_gradients` was called 7 times with the fixed gradients in
  `GRADIENTS` (no loss, no randomness): 3 applied updates (calls 2, 4, 6) and
  one pending accumulation micro-step (call 7), so `iterations` = 3, the
  accumulation counter = 1 and the accumulators hold the 7th gradient.

Files written (a few KB in all):

- `ckpt-1.index`, `ckpt-1.data-00000-of-00001`: the checkpoint (the
  `checkpoint` state file is removed: tests restore by explicit prefix);
- `expected.json`: the config, the initial values, the gradients, the
  checkpoint's key list, and every value after the 7 calls: `iterations`,
  `accumulation_count`, each hyperparameter, and per model variable its value
  and slots (`momentum`, `velocity`, `velocity_hat`, `average`,
  `accumulator`). float32 values are stored as exact decimal floats.

It was produced with tf_adamw 0.1.0 on TensorFlow 2.21 / Keras 3.15.1, CPU.
Do NOT regenerate it to make a failing test pass: the point of a golden
checkpoint is that checkpoints written by earlier versions keep restoring. A
deliberate format change gets a new directory (`adamw_v2/`) and a new test,
and the README says how old checkpoints are migrated.
"""

import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_adamw  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adamw_v1")

CONFIG = {
    "learning_rate": 0.01,
    "weight_decay": 0.004,
    "amsgrad": True,
    "use_ema": True,
    "ema_momentum": 0.99,
    "gradient_accumulation_steps": 2,
}

INITIAL = {
    "dense/kernel": [[0.5, -0.25], [1.0, 0.75], [-1.5, 0.125]],
    "dense/bias": [0.1, -0.2],
}


def gradient(call):
    """The fixed gradients of call `call` (0-based): kernel, bias."""
    kernel = (np.arange(6, dtype=np.float64).reshape(3, 2) - 2.5) * 0.1 * (
        call + 1) + (0.05 if call % 2 else -0.05)
    bias = np.array([0.3, -0.1]) * (-1.0) ** call + 0.02 * call
    return [kernel.astype(np.float32), bias.astype(np.float32)]


NUM_CALLS = 7
GRADIENTS = [gradient(c) for c in range(NUM_CALLS)]


def _floats(array):
    return np.asarray(array).astype(np.float64).tolist()


def main():
    model = tf.Module(name="model")
    model.kernel = tf.Variable(np.array(INITIAL["dense/kernel"], np.float32),
                               name="dense/kernel")
    model.bias = tf.Variable(np.array(INITIAL["dense/bias"], np.float32),
                             name="dense/bias")
    opt = tf_adamw.AdamW(**CONFIG)
    for kernel_grad, bias_grad in GRADIENTS:
        opt.apply_gradients([(tf.constant(kernel_grad), model.kernel),
                             (tf.constant(bias_grad), model.bias)])

    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(
        os.path.join(OUT, "ckpt"))
    os.remove(os.path.join(OUT, "checkpoint"))

    expected = {
        "iterations": int(opt.iterations.numpy()),
        "accumulation_count": int(opt._accumulation_count.numpy()),  # pylint: disable=protected-access
        "hyperparameters": {
            name: float(getattr(opt, name).numpy())
            for name in ("weight_decay", "beta_1", "beta_2", "epsilon")
        },
        "learning_rate": float(opt.learning_rate.numpy()),
        "variables": {},
    }
    for name, variable in (("dense/kernel", model.kernel),
                           ("dense/bias", model.bias)):
        entry = {"value": _floats(variable.numpy())}
        for kind, slot in opt.slots_for(variable).items():
            entry[kind] = _floats(slot.numpy())
        expected["variables"][name] = entry

    document = {
        "produced_by": "tests/golden/make_golden.py",
        "checkpoint_prefix": os.path.basename(path),
        "config": CONFIG,
        "model_attributes": {"kernel": "dense/kernel", "bias": "dense/bias"},
        "initial": INITIAL,
        "gradients": [[_floats(k), _floats(b)] for k, b in GRADIENTS],
        "checkpoint_keys": [[k, list(s)] for k, s in
                            tf.train.list_variables(path)],
        "expected": expected,
    }
    # One top-level key per line: small, and diffs stay readable.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in document.items()]
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print("wrote", path, "and expected.json")


if __name__ == "__main__":
    main()
