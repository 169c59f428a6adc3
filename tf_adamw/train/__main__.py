"""python -m tf_adamw.train --config_file=tpu_configs/cpu_local.yaml [flags]

Trains (or resumes) the run described by the config in its model directory.
`task.name` picks what is trained: the built-in char_lm, or your own model
and data as `package.module:callable` (the protocol: tf_adamw/train/task.py).

Precedence, lowest first: the config keys' defaults, the --config_file files
(later files win), --params_override, then the plain flags (--model_dir,
--tpu, --train_steps, --learning_rate, --global_batch_size).

Exit status: 0 when the run finished, was already complete, or saved a
checkpoint and stopped on SIGTERM; 130 when it saved and stopped on SIGINT
(Ctrl-C; a second Ctrl-C stops at once, without saving); 2 for a config,
model-directory or device error (one line on stderr).
"""

import os
import re
import sys
import tempfile
import textwrap

from absl import app
from absl import flags
from absl import logging

# Importing this module, parsing the flags and checking the config import no
# TensorFlow: `--help` and config errors answer at once. TensorFlow is
# imported in `main`, after the config is valid.
from tf_adamw.train import config as config_lib

FLAGS = flags.FLAGS
flags.DEFINE_multi_string(
    "config_file", None, "YAML config file(s); later files override earlier.")
flags.DEFINE_string(
    "params_override", "",
    "Overrides: 'trainer.train_steps=20,runtime.num_cpus=4', a YAML mapping, "
    "or a YAML file path; wins over the config files.")
flags.DEFINE_string("model_dir", None,
                    "Output directory of the run; wins over trainer.model_dir.")
flags.DEFINE_string("tpu", None, "TPU name; wins over runtime.tpu.")
for _name, _key in config_lib.FLAG_KEYS.items():
    # Strings, read as YAML like --params_override values: one error format
    # for every source of a value.
    flags.DEFINE_string(_name, None, f"Sets {_key}; wins over the config "
                        "files and --params_override.")
flags.DEFINE_bool("verbose", False,
                  "Show TensorFlow's own log lines (C++ and Python), which "
                  "are hidden by default.")

_HELP_ARGS = ("--help", "-h", "-?", "--helpshort")
_OWN_FLAGS = ("config_file", "params_override", "model_dir", "tpu",
              *config_lib.FLAG_KEYS, "verbose")
# What TensorFlow's C++ libraries print while they load, before their
# logging is initialised (so TF_CPP_MIN_LOG_LEVEL cannot hide it): INFO and
# WARNING records such as "oneDNN custom operations are on" and "Could not
# find cuda drivers". Errors and anything else are kept.
_IMPORT_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called "
    r"are written to STDERR|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] .*)$")


def help_text():
    """`--help`: usage, this CLI's flags, and every config key's default."""
    lines = ["usage: " + __doc__.strip(), "", "Flags:"]
    for name in _OWN_FLAGS:
        flag = FLAGS[name]
        default = "" if flag.default in (None, "") else (
            f" (default: {flag.default})")
        text = " ".join(flag.help.split())  # absl adds a line break
        lines += textwrap.wrap(f"--{name}: {text}{default}", width=79,
                               initial_indent="  ",
                               subsequent_indent="      ")
    lines += ["", "Config keys (YAML sections; --params_override=key=value), "
              "with their defaults:"]
    lines += config_lib.describe_keys()
    lines += ["", "absl's own flags (logging): --helpfull."]
    return "\n".join(lines)


def _import_tensorflow(verbose):
    """Imports TensorFlow, quietly unless `verbose`.

    TF_CPP_MIN_LOG_LEVEL=3 hides the C++ log lines once logging is set up
    (e.g. the "failed call to cuInit" error on a machine without a GPU);
    what the libraries print while loading is captured from file
    descriptor 2 and replayed without the INFO/WARNING records.
    """
    if verbose:
        import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf  # pylint: disable=g-import-not-at-top
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines()
                    if line.strip() and not _IMPORT_NOISE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)
    tf.get_logger().setLevel("WARNING")


def _load_config():
    return config_lib.load(
        FLAGS.config_file or [], FLAGS.params_override, FLAGS.model_dir,
        FLAGS.tpu, {name: FLAGS[name].value for name in config_lib.FLAG_KEYS})


def _error(e):
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return 2


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.verbose:
        logging.set_verbosity(logging.INFO)
    elif not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # progress lines only
    # The config is read and checked before TensorFlow is imported: a bad
    # key fails in well under a second, and devices are configured (in
    # loop.train) before TensorFlow initialises them.
    try:
        config = _load_config()
    except config_lib.ConfigError as e:
        return _error(e)
    _import_tensorflow(FLAGS.verbose)
    from tf_adamw.train import loop  # pylint: disable=g-import-not-at-top
    from tf_adamw.train import rundir  # pylint: disable=g-import-not-at-top
    from tf_adamw.train import runtime  # pylint: disable=g-import-not-at-top
    try:
        result = loop.train(config)
    except (config_lib.ConfigError, rundir.RunDirError,
            runtime.TPUNotFoundError, runtime.DeviceSetupError) as e:
        return _error(e)
    except KeyboardInterrupt:
        # Ctrl-C before the training loop (nothing trained yet), or a
        # second one inside it.
        print("Interrupted: stopped without saving; the newest checkpoint in "
              f"{config.trainer.model_dir} is where a re-run resumes.",
              file=sys.stderr, flush=True)
        return 130
    # 128 + SIGINT: what a shell reports for a job stopped by Ctrl-C.
    return 130 if result.stopped_by == "SIGINT" else 0


def run(argv=None):
    """The CLI: `--help` here (exit 0), everything else through absl.

    absl's own `--help` exits with status 1 and knows nothing of the config
    keys; `--helpfull` still reaches it.
    """
    argv = list(sys.argv if argv is None else argv)
    if any(arg in _HELP_ARGS for arg in argv[1:]):
        try:
            print(help_text(), flush=True)
        except BrokenPipeError:  # `--help | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    app.run(main, argv)


if __name__ == "__main__":
    run()
