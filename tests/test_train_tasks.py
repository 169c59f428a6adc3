"""The trainer's task protocol, evaluation and the choice of export weights.

- A user's task by import path (`task.name: module:callable`): a small
  regression task defined here, duck-typed (no `Task` base, no optional
  methods: the default serving module), trains, evaluates and exports.
- Errors: a `task.name` that does not resolve, an object that is not a
  task, a factory that refuses its params: one-line ConfigErrors, before
  anything is written.
- Evaluation changes no bit of training; eval rows reach the console,
  metrics.jsonl and TensorBoard.
- `trainer.export_weights`: best (the better of raw and EMA, checked by
  evaluating the exported SavedModel), ema, raw.
- The example task (examples/font_digits.py) from the CLI.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import yaml

from tf_adamw.train import artifacts
from tf_adamw.train import config as config_lib
from tf_adamw.train import evaluation
from tf_adamw.train import loop
from tf_adamw.train import rundir
from tf_adamw.train import task as task_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tpu_configs")
# As tests/test_train.py: the default config with a tiny model.
TINY = ("task.params.d_model=32,task.params.num_layers=1,"
        "task.params.num_heads=2,task.params.corpus_chars=20000,"
        "task.params.eval_corpus_chars=4000,task.params.eval_batches=2,"
        "task.optimizer.warmup_steps=2")
STEPS = ("trainer.steps_per_loop=5,trainer.log_every_n_steps=5,"
         "trainer.checkpoint_every_n_steps=10,trainer.loss_curve=false")
REGRESSION = (f"task.name={__name__}:build_regression,"
              "task.optimizer.learning_rate=0.05,"
              "task.optimizer.warmup_steps=2,trainer.train_steps=20,"
              "task.optimizer.use_ema=true,task.optimizer.ema_momentum=0.9,"
              + STEPS)


# ---------------------------------------------------------------------------
# A user's task, as a module of theirs would define it.


class _Linear(tf.Module):
    def __init__(self, features, seed):
        super().__init__(name="linear")
        rng = np.random.default_rng(seed)
        self.kernel = tf.Variable(
            rng.normal(0, 0.1, [features, 1]).astype(np.float32),
            name="kernel")
        self.bias = tf.Variable(np.zeros([1], np.float32), name="bias")

    def __call__(self, x, training=False):
        del training
        return tf.squeeze(tf.matmul(x, self.kernel), -1) + self.bias


class RegressionTask:
    """y = x . w + noise; squared error per example. Duck-typed: only the
    four required methods."""

    def __init__(self, params, context):
        self.features = params.get("features", 4)
        self.noise = params.get("noise", 0.1)
        self.seed = context.seed
        self.w = np.linspace(-1.0, 1.0, self.features).astype(np.float32)

    def build_model(self):
        return _Linear(self.features, self.seed)

    def _batch(self, step, size):
        z = tf.random.stateless_normal(
            [size, self.features + 1],
            seed=tf.stack([tf.constant(self.seed, tf.int64), step]))
        x = z[:, :-1]
        return x, tf.linalg.matvec(x, tf.constant(self.w)) + (
            self.noise * z[:, -1])

    def train_dataset(self, global_batch_size, start_step):
        return tf.data.Dataset.range(start_step, 2**62).map(
            lambda i: self._batch(i, global_batch_size))

    def eval_dataset(self, global_batch_size):
        # Negative batch numbers: never a training batch.
        return tf.data.Dataset.range(-3, 0).map(
            lambda i: self._batch(i, global_batch_size))

    def loss(self, targets, outputs):
        return tf.square(outputs - targets)


def build_regression(params, context):
    unknown = sorted(set(params) - {"features", "noise"})
    if unknown:
        raise ValueError(f"unknown keys {unknown}; known: features, noise")
    return RegressionTask(params, context)


def build_scalar_loss(params, context):
    """A task whose loss is not per example (a scalar)."""
    task = RegressionTask(params, context)
    task.loss = lambda targets, outputs: tf.reduce_mean(
        tf.square(outputs - targets))
    return task


class NotATask:
    def build_model(self):
        return None


def build_not_a_task(params, context):
    del params, context
    return NotATask()


class HalfATask(task_lib.Task):
    def build_model(self):
        return None


def build_half_a_task(params, context):
    del params, context
    return HalfATask()  # abstract: no datasets, no loss


def build_one_argument(params):
    return RegressionTask(params, None)


NOT_CALLABLE = 3


def _load(override, model_dir, name="cpu_local"):
    return config_lib.load(os.path.join(CONFIGS, name + ".yaml"), override,
                           model_dir=str(model_dir))


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path),
                TF_CPP_MIN_LOG_LEVEL="2")


# ---------------------------------------------------------------------------
# A user's task.


def test_a_task_given_by_import_path_trains_evaluates_and_exports(
        tmp_path, capsys):
    result = loop.train(_load(REGRESSION + ",trainer.eval_every_n_steps=10",
                              tmp_path))
    out = capsys.readouterr().out
    # No describe_example: the batch is just its size.
    assert "global batch 32, model_dir" in out
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.25 * losses[0], losses
    assert [row["step"] for row in result.evals] == [10, 20]
    assert "eval step 10/20 | loss " in out and "| loss_ema " in out
    final = result.evals[-1]
    assert final[evaluation.LOSS] < 0.25 * losses[0]
    # The default serving module: `inputs` -> {"outputs": model(inputs)}.
    served = tf.saved_model.load(result.exports["serving_dir"])
    x = tf.random.stateless_normal([3, 4], seed=[1, 2])
    y = served.signatures["serving_default"](inputs=x)["outputs"]
    assert y.shape == (3,)
    # The training SavedModel takes the task's batches of any size.
    training = tf.saved_model.load(result.exports["training_dir"])
    step = training.train_step(x, tf.zeros([3]))
    assert np.isfinite(step["loss"].numpy())
    assert result.exports["summary"] is None
    with open(os.path.join(tmp_path, "config.yaml")) as f:
        assert f"name: {__name__}:build_regression" in f.read()


def test_a_resume_keeps_the_task_and_its_params(tmp_path):
    base = REGRESSION + ",trainer.export_saved_models=false"
    loop.train(_load(base + ",task.params.noise=0.2,trainer.train_steps=10",
                     tmp_path))
    for override, text in (
            (",task.params.noise=0.3", "task.params.noise 0.2 -> 0.3"),
            ("", "task.params.noise 0.2 -> (unset)"),
            (",task.params.noise=0.2,task.params.features=4",
             "task.params.features (unset) -> 4"),
            (",task.name=char_lm", "task.name")):
        with pytest.raises(rundir.RunDirError, match="another model/data"
                           ) as e:
            loop.train(_load(base + override, tmp_path))
        assert text in str(e.value)
    result = loop.train(_load(base + ",task.params.noise=0.2", tmp_path))
    assert result.start_step == 10 and result.final_step == 20


def test_an_old_config_yaml_is_read_with_the_keys_at_their_new_places(
        tmp_path):
    """A run directory from before task.params (char_lm keys under
    task.model and task.data) still has its model and data checked."""
    old = config_lib.to_dict(config_lib.load([]))
    params = old["task"].pop("params")
    old["task"].pop("name")
    old["task"]["model"] = {k: params[k] for k in (
        "num_layers", "d_model", "num_heads", "mlp_ratio")}
    old["task"]["data"].update({k: params[k] for k in (
        "corpus_chars", "eval_corpus_chars", "seq_len", "eval_batches")})
    (tmp_path / rundir.CONFIG_FILE).write_text(yaml.safe_dump(old))
    same = config_lib.load([], model_dir=str(tmp_path))
    assert rundir.check_resume(str(tmp_path), same, 5) is not None
    other = config_lib.load([], "task.params.d_model=64",
                            model_dir=str(tmp_path))
    with pytest.raises(rundir.RunDirError,
                       match=r"task.params.d_model 128 -> 64"):
        rundir.check_resume(str(tmp_path), other, 5)


@pytest.mark.parametrize("name, message", [
    ("no_such_module_h10:build",
     "does not resolve: importing 'no_such_module_h10' failed "
     "(ModuleNotFoundError"),
    (f"{__name__}:no_such_factory", "has no attribute 'no_such_factory'"),
    (f"{__name__}:NOT_CALLABLE", "names 3 (type int), not a callable"),
    (f"{__name__}:build_not_a_task", "returned a NotATask, which does not "
     "implement the task protocol: no train_dataset, eval_dataset, loss"),
    (f"{__name__}:build_half_a_task", "does not implement the task "
     "protocol: Can't instantiate abstract class HalfATask"),
    (f"{__name__}:build_one_argument", "must take two arguments"),
])
def test_a_bad_task_name_is_a_config_error_before_anything_is_written(
        tmp_path, name, message):
    config = _load(f"task.name={name}", tmp_path / "run")
    with pytest.raises(config_lib.ConfigError) as e:
        loop.train(config)
    text = str(e.value)
    assert text.startswith(f"key `task.name` ({name!r})") and message in text
    assert "\n" not in text
    assert not os.path.exists(tmp_path / "run")


def test_a_factory_refusing_its_params_is_a_config_error(tmp_path):
    config = _load(REGRESSION + ",task.params.nois=0.2", tmp_path / "run")
    with pytest.raises(config_lib.ConfigError,
                       match=r"key `task.params` is invalid for task "
                       r"'test_train_tasks:build_regression': unknown keys "
                       r"\['nois'\]"):
        loop.train(config)
    assert not os.path.exists(tmp_path / "run")
    # The built-in task checks its keys when the config is loaded.
    with pytest.raises(config_lib.ConfigError,
                       match="--params_override: unknown key "
                       "`task.params.d_modl`"):
        _load("task.params.d_modl=3", tmp_path)


def test_a_loss_that_is_not_per_example_is_an_error(tmp_path):
    config = _load(REGRESSION.replace("build_regression",
                                      "build_scalar_loss"), tmp_path)
    with pytest.raises(ValueError, match=r"must return per-example losses "
                       r"of shape \[batch\] or \[batch, ...\]"):
        loop.train(config)


@pytest.mark.multiprocess
def test_cli_bad_task_name_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tf_adamw.train",
         "--config_file=tpu_configs/cpu_local.yaml",
         "--params_override=task.name=my_tasks_h10:build",
         f"--model_dir={tmp_path / 'run'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        "error: ConfigError: key `task.name` ('my_tasks_h10:build') does not "
        "resolve"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------------------
# Evaluation.


def _tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {key: reader.get_tensor(key)
            for key in reader.get_variable_to_shape_map()}


def _tags(event_dir):
    tags = set()
    for name in os.listdir(event_dir):
        for record in tf.data.TFRecordDataset(os.path.join(event_dir, name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_evaluating_changes_no_bit_of_training(tmp_path, capsys):
    """Eval (raw and EMA weights) after every call vs only at the end: the
    same losses and checkpoints, bit for bit."""
    override = (TINY + "," + STEPS + ",trainer.train_steps=20,"
                "trainer.export_saved_models=false")
    often = loop.train(_load(override + ",trainer.eval_every_n_steps=5",
                             tmp_path / "often"))
    out = capsys.readouterr().out
    at_end = loop.train(_load(override + ",trainer.eval_every_n_steps=0",
                              tmp_path / "end"))
    assert [r["step"] for r in often.evals] == [5, 10, 15, 20]
    assert [r["step"] for r in at_end.evals] == [20]
    assert often.evals[-1] == at_end.evals[-1]
    assert [r["loss"] for r in often.history] == [
        r["loss"] for r in at_end.history]
    a, b = _tensors(often.checkpoint), _tensors(at_end.checkpoint)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Console, metrics.jsonl (its own row per eval, merged when read) and
    # TensorBoard.
    assert "eval step  5/20 | loss " in out, out
    rows = artifacts.read_history(os.path.join(tmp_path, "often",
                                               "metrics.jsonl"))
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all({"loss", "eval/loss", "eval/loss_ema"} <= set(r) for r in rows)
    assert {"loss", "eval/loss", "eval/loss_ema"} <= _tags(
        os.path.join(tmp_path, "often", "train"))


@pytest.mark.parametrize("mode, losses, expected", [
    ("best", {"eval/loss": 0.67, "eval/loss_ema": 1.28}, "raw"),
    ("best", {"eval/loss": 1.28, "eval/loss_ema": 0.67}, "ema"),
    ("best", {"eval/loss": 1.0, "eval/loss_ema": 1.0}, "raw"),  # a tie
    ("best", {"eval/loss": math.nan, "eval/loss_ema": 3.0}, "ema"),
    ("best", {"eval/loss": 0.5, "eval/loss_ema": math.inf}, "raw"),
    ("best", {"eval/loss": 0.5}, "raw"),  # no EMA
    ("ema", {"eval/loss": 0.67, "eval/loss_ema": 1.28}, "ema"),
    ("raw", {"eval/loss": 1.28, "eval/loss_ema": 0.67}, "raw"),
])
def test_choose_weights(mode, losses, expected):
    assert evaluation.choose_weights(mode, losses) == expected


def _serving_eval_loss(serving_dir, config):
    """The char LM's eval loss of a serving SavedModel, evaluated here."""
    task = task_lib.build(config)
    serve = tf.saved_model.load(serving_dir).signatures["serving_default"]
    total = count = 0.0
    for inputs, targets in task.eval_dataset(
            config.task.data.global_batch_size):
        losses = task.loss(targets, serve(tokens=inputs)["logits"])
        total += float(tf.reduce_sum(losses))
        count += float(tf.size(losses))
    return total / count


def test_best_exports_the_weights_that_evaluate_better_mirrored(
        tmp_path, capsys):
    """4 replicas; the EMA (momentum 0.99) lags a short run far behind."""
    config = _load(TINY + "," + STEPS + ",trainer.train_steps=30,"
                   "trainer.eval_every_n_steps=10", tmp_path,
                   "cpu_mirrored_4")
    result = loop.train(config)
    out = capsys.readouterr().out
    final = result.evals[-1]
    raw, ema = final[evaluation.LOSS], final[evaluation.LOSS_EMA]
    assert abs(raw - ema) > 0.1, final  # a choice that matters
    exported = _serving_eval_loss(result.exports["serving_dir"], config)
    assert exported == pytest.approx(min(raw, ema), rel=1e-4)
    weights = "ema" if ema < raw else "raw"
    assert result.exports["weights"] == weights
    with open(result.exports["weights_file"]) as f:
        info = json.load(f)
    assert info["weights"] == weights and info["export_weights"] == "best"
    assert info["eval/loss"] == raw and info["eval/loss_ema"] == ema
    name = "EMA weights" if weights == "ema" else "raw weights"
    assert f"Serving export: {name} (eval loss {min(raw, ema):.4f};" in out


def test_export_weights_ema_and_raw_and_a_late_export(tmp_path, capsys):
    """A run that ended without exports writes them when re-run, with the
    final eval it logged, as `trainer.export_weights` says."""
    override = TINY + "," + STEPS + ",trainer.train_steps=10"
    loop.train(_load(override + ",trainer.export_saved_models=false",
                     tmp_path))
    final = artifacts.read_history(os.path.join(tmp_path,
                                                "metrics.jsonl"))[-1]
    for mode, key in (("ema", evaluation.LOSS_EMA),
                      ("raw", evaluation.LOSS)):
        capsys.readouterr()
        result = loop.train(_load(
            override + f",trainer.export_weights={mode}", tmp_path))
        assert result.already_complete
        out = capsys.readouterr().out
        assert "writing the missing exports" in out
        assert result.exports["weights"] == mode
        assert f"trainer.export_weights={mode})" in out
        assert result.exports["losses"] == {
            k: final[k] for k in (evaluation.LOSS, evaluation.LOSS_EMA)}
        exported = _serving_eval_loss(result.exports["serving_dir"],
                                      _load(override, tmp_path))
        assert exported == pytest.approx(final[key], rel=1e-5)
        os.remove(result.exports["weights_file"])  # "missing" again


def test_without_ema_the_export_is_raw_and_says_so(tmp_path, capsys):
    result = loop.train(_load(
        TINY + "," + STEPS + ",trainer.train_steps=5,"
        "task.optimizer.use_ema=false", tmp_path))
    out = capsys.readouterr().out
    assert list(result.evals[-1]) == ["step", "eval/loss"]
    assert result.exports["weights"] == "raw"
    assert "Serving export: raw weights (eval loss" in out
    assert "no EMA: task.optimizer.use_ema is false" in out


# ---------------------------------------------------------------------------
# The example task, from the CLI.


@pytest.mark.multiprocess
def test_font_digits_example_trains_from_the_cli(tmp_path):
    model_dir = tmp_path / "digits"
    proc = subprocess.run(
        [sys.executable, "-m", "tf_adamw.train",
         "--config_file=tpu_configs/cpu_font_digits.yaml",
         "--params_override=trainer.train_steps=60,trainer.steps_per_loop=10,"
         "trainer.log_every_n_steps=10,trainer.checkpoint_every_n_steps=30,"
         "trainer.eval_every_n_steps=30,task.params.variants=16,"
         "trainer.loss_curve=false",
         f"--model_dir={model_dir}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:])
    out = proc.stdout
    assert "global batch 64 x 28x28 images" in out
    rows = artifacts.read_history(os.path.join(model_dir, "metrics.jsonl"))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] > 1.5 and losses[-1] < 0.5 * losses[0], losses
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < 1.0, evals  # ln 10 = 2.30
    assert "Held-out fonts (STIXGeneral" in out and "read right" in out
    served = tf.saved_model.load(str(model_dir / "export" / "serving"))
    out = served.signatures["serving_default"](
        images=tf.zeros([2, 28, 28]))
    assert out["probabilities"].shape == (2, 10)
    assert out["digit"].dtype == tf.int32
