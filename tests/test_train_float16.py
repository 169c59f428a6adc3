"""Mixed precision end to end: the trainer with float16 compute and the
dynamic loss scale (`task.optimizer.loss_scale: dynamic`).

The task here decodes 16 latent numbers into 4,096 outputs (an image's
pixels, say) with a per-element squared error, as a user's task would
define it. Averaged over 256 x 4,096 elements, the loss's gradient at the
float16 output is 2 x residual / 1M, about 1e-8: below float16's smallest
subnormal (6e-8), so without loss scaling every gradient is exactly 0 and
training stalls; with the dynamic scale (2**15) it trains like float32.
On one device and on 2 logical CPUs under MirroredStrategy.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from tf_adamw.train import config as config_lib
from tf_adamw.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tpu_configs")
DECODER = (
    f"task.name={__name__}:build_decoder,"
    "task.data.global_batch_size=256,task.optimizer.learning_rate=0.002,"
    "task.optimizer.warmup_steps=2,task.optimizer.weight_decay=0.0,"
    "task.optimizer.use_ema=false,trainer.train_steps=40,"
    "trainer.eval_every_n_steps=40,trainer.steps_per_loop=10,"
    "trainer.log_every_n_steps=10,trainer.checkpoint_every_n_steps=20,"
    "trainer.export_saved_models=false,trainer.loss_curve=false")


class _Decoder(tf.Module):
    """latent -> relu(latent @ hidden) @ out, in the compute dtype."""

    def __init__(self, latent, hidden, outputs, seed, compute_dtype):
        super().__init__(name="decoder")
        rng = np.random.default_rng(seed)
        self.hidden = tf.Variable(rng.normal(
            0, latent ** -0.5, [latent, hidden]).astype(np.float32),
            name="hidden/kernel")
        self.out = tf.Variable(rng.normal(
            0, 1e-3 * hidden ** -0.5, [hidden, outputs]).astype(np.float32),
            name="out/kernel")
        self.dtype = tf.as_dtype(compute_dtype)

    def __call__(self, z, training=False):
        del training
        h = tf.nn.relu(tf.matmul(tf.cast(z, self.dtype),
                                 tf.cast(self.hidden, self.dtype)))
        return tf.cast(tf.matmul(h, tf.cast(self.out, self.dtype)),
                       tf.float32)


class DecoderTask:
    """Targets 0.01 * tanh(z @ A): small residuals over many outputs."""

    latent, hidden, outputs = 16, 64, 4096

    def __init__(self, context):
        self.seed, self.compute_dtype = context.seed, context.compute_dtype
        self.a = np.random.default_rng(7).normal(
            size=(self.latent, self.outputs)).astype(np.float32) / 4

    def build_model(self):
        return _Decoder(self.latent, self.hidden, self.outputs, self.seed,
                        self.compute_dtype)

    def _batch(self, step, size):
        z = tf.random.stateless_normal(
            [size, self.latent],
            seed=tf.stack([tf.constant(self.seed, tf.int64), step]))
        return z, 0.01 * tf.tanh(tf.matmul(z, tf.constant(self.a)))

    def train_dataset(self, global_batch_size, start_step):
        return tf.data.Dataset.range(start_step, 2**62).map(
            lambda i: self._batch(i, global_batch_size))

    def eval_dataset(self, global_batch_size):
        return tf.data.Dataset.range(-2, 0).map(
            lambda i: self._batch(i, global_batch_size))

    def loss(self, targets, outputs):
        return tf.square(outputs - targets)


def build_decoder(params, context):
    if params:
        raise ValueError(f"takes no params; got {sorted(params)}")
    return DecoderTask(context)


def _train(tmp_path, name, override):
    config = config_lib.load(os.path.join(CONFIGS, "cpu_local.yaml"),
                             DECODER + "," + override,
                             model_dir=str(tmp_path / name))
    return loop.train(config)


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("f32"), "run",
                  "runtime.mixed_precision_dtype=float32")


@pytest.mark.parametrize("strategy", ["one_device", "mirrored"])
def test_float16_trains_with_the_dynamic_scale_and_stalls_without(
        tmp_path, float32_run, strategy):
    where = (f"runtime.distribution_strategy={strategy}"
             + (",runtime.num_cpus=2" if strategy == "mirrored" else ""))
    plain = _train(tmp_path, "plain", where + (
        ",runtime.mixed_precision_dtype=float16,"
        "task.optimizer.loss_scale=none"))
    scaled = _train(tmp_path, "scaled", where + (
        ",runtime.mixed_precision_dtype=float16,"
        "task.optimizer.loss_scale=dynamic"))
    # Without a loss scale every gradient underflows to exactly 0: the
    # weights never move, and the loss stays where it started.
    assert all(row["grad_norm"] == 0.0 for row in plain.history)
    plain_losses = [row["loss"] for row in plain.history]
    np.testing.assert_allclose(plain_losses, plain_losses[0], rtol=0.05)
    # With it, float16 trains as float32 does.
    scaled_eval = scaled.evals[-1]["eval/loss"]
    assert scaled_eval < 0.3 * plain.evals[-1]["eval/loss"]
    np.testing.assert_allclose(scaled_eval, float32_run.evals[-1]["eval/loss"],
                               rtol=0.02)
    assert all(row["grad_norm"] > 0 for row in scaled.history)


def test_the_dynamic_scale_is_checkpointed_and_resumed(tmp_path):
    override = ("runtime.mixed_precision_dtype=float16,"
                "task.optimizer.loss_scale=dynamic,"
                "task.optimizer.dynamic_growth_steps=15,"
                # A constant rate after warmup: stopping at 20 changes no
                # learning rate.
                "task.optimizer.end_learning_rate_ratio=1.0")
    whole = _train(tmp_path, "whole", override)
    _train(tmp_path, "halves", override + ",trainer.train_steps=20")
    resumed = _train(tmp_path, "halves", override)
    assert resumed.start_step == 20
    np.testing.assert_array_equal(
        [row["loss"] for row in resumed.history],
        [row["loss"] for row in whole.history if row["step"] > 20])
    reader = tf.train.load_checkpoint(str(tmp_path / "halves" / "checkpoints"))
    scales = [k for k in reader.get_variable_to_shape_map()
              if "_dynamic_scale" in k]
    assert scales, "the dynamic scale is not in the checkpoint"
    # 40 finite steps with growth every 15: doubled twice.
    assert reader.get_tensor(scales[0]) == 2.0 ** 17


def test_the_float16_config_loads_and_names_its_choices():
    config = config_lib.load(os.path.join(CONFIGS, "cpu_float16.yaml"))
    assert config.runtime.mixed_precision_dtype == "float16"
    arguments = config.task.optimizer.adamw_arguments()
    assert arguments["loss_scale"] == "dynamic"
    assert arguments["initial_scale"] == 2.0 ** 15
    assert arguments["dynamic_growth_steps"] == 2000
    plain = config_lib.load(os.path.join(CONFIGS, "cpu_local.yaml"))
    assert plain.task.optimizer.adamw_arguments()["loss_scale"] is None
    assert "initial_scale" not in plain.task.optimizer.adamw_arguments()


@pytest.mark.parametrize("override, key", [
    ("task.optimizer.loss_scale=static", "task.optimizer.loss_scale"),
    ("task.optimizer.initial_scale=0", "task.optimizer.initial_scale"),
    ("task.optimizer.dynamic_growth_steps=0",
     "task.optimizer.dynamic_growth_steps"),
    ("runtime.mixed_precision_dtype=float8", "runtime.mixed_precision_dtype"),
])
def test_bad_loss_scale_keys_are_one_line_errors(override, key):
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        config_lib.load(os.path.join(CONFIGS, "cpu_local.yaml"), override)


def test_the_training_savedmodel_scales_its_loss(tmp_path):
    """The exported `train_step` scales the loss by the dynamic scale it
    carries: a loaded model's next step is the trainer's next step."""
    override = ("runtime.mixed_precision_dtype=float16,"
                "task.optimizer.loss_scale=dynamic,"
                "task.optimizer.end_learning_rate_ratio=1.0,"
                "task.optimizer.initial_scale=1024")
    longer = _train(tmp_path, "longer", override + ",trainer.train_steps=11")
    result = _train(tmp_path, "run", override + (
        ",trainer.export_saved_models=true,trainer.train_steps=10"))
    loaded = tf.saved_model.load(result.exports["training_dir"])
    task = DecoderTask(type("Context", (), {"seed": 0,
                                            "compute_dtype": "float16"}))
    # Batch 10 is the trainer's 11th step.
    out = loaded.train_step(*task._batch(tf.constant(10, tf.int64), 256))
    np.testing.assert_allclose(out["loss"].numpy(),
                               longer.history[-1]["loss"], rtol=1e-6)
    reader = tf.train.load_checkpoint(str(tmp_path / "longer" /
                                          "checkpoints"))
    [key] = [k for k in reader.get_variable_to_shape_map()
             if k.endswith("out/.ATTRIBUTES/VARIABLE_VALUE")
             and "optimizer" not in k]
    np.testing.assert_allclose(loaded.model.out.numpy(),
                               reader.get_tensor(key), rtol=1e-5, atol=1e-9)
