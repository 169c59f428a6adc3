"""Resumes training SavedModels in a new process, for tests/test_export.py.

Usage: python export_worker.py RUNS.json

RUNS.json: {"runs": [{"export_dir": ..., "first": N, "count": M,
                      "out": PREFIX}, ...]}

For each run: `tf.saved_model.load(export_dir)` (plain TensorFlow: neither
tf_adamw nor the model's Python code is imported), `loaded.train_step` on
the batches of steps N .. N+M-1, then `tf.train.Checkpoint(loaded).write(
PREFIX)`, so that the test compares every variable (model, slots, counters)
by checkpoint key with the uninterrupted run. Prints "imports ok" when
tf_adamw was never imported.
"""

import json
import os
import sys

GLOBAL_BATCH = 16


def batch(step):
    """The global batch of step `step` (the same in every process)."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((GLOBAL_BATCH, 4)).astype(np.float32)
    y = rng.standard_normal((GLOBAL_BATCH, 3)).astype(np.float32)
    return x, y


def main():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for run in spec["runs"]:
        loaded = tf.saved_model.load(run["export_dir"])
        for step in range(run["first"], run["first"] + run["count"]):
            loaded.train_step(*batch(step))
        tf.train.Checkpoint(loaded).write(run["out"])
    if "tf_adamw" not in sys.modules:
        print("imports ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
