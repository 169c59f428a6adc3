"""CLI: python -m tf_adamw.train --config_file=tpu_configs/cpu_local.yaml

Flags (in the style of the TF Model Garden):
  --config_file      YAML config; may be repeated (later files win).
  --params_override  `a.b=1,c.d=x`, a YAML mapping, or a YAML file; wins over
                     the config files.
  --model_dir        where checkpoints, TensorBoard logs, SavedModels and
                     loss_curve.png go; wins over trainer.model_dir.
  --tpu              TPU name ("local" on a TPU VM); wins over runtime.tpu.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string(
    "config_file", None, "YAML config file(s); later files override earlier.")
flags.DEFINE_string(
    "params_override", "",
    "Overrides: 'trainer.train_steps=20,runtime.num_cpus=4', a YAML mapping, "
    "or a YAML file path.")
flags.DEFINE_string("model_dir", None, "Output directory of the run.")
flags.DEFINE_string("tpu", None, "TPU name; overrides runtime.tpu.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # progress lines only
    # The config is read and checked before TensorFlow is imported: a bad
    # key fails in well under a second, and devices are configured (in
    # loop.train) before TensorFlow initialises them.
    from tf_adamw.train import config as config_lib  # pylint: disable=g-import-not-at-top
    try:
        config = config_lib.load(FLAGS.config_file or [],
                                 FLAGS.params_override, FLAGS.model_dir,
                                 FLAGS.tpu)
    except config_lib.ConfigError as e:
        print(f"error: ConfigError: {e}", file=sys.stderr, flush=True)
        return 2
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tf_adamw.train import loop  # pylint: disable=g-import-not-at-top
    from tf_adamw.train import runtime  # pylint: disable=g-import-not-at-top
    if not FLAGS["verbosity"].present:
        tf.get_logger().setLevel("WARNING")
    try:
        loop.train(config)
    except (config_lib.ConfigError, runtime.TPUNotFoundError,
            runtime.DeviceSetupError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
