"""The run directory: one trainer at a time, and what a resume may change.

A model directory belongs to one run. These rules keep it that way:

- **One trainer per directory.** The trainer holds an exclusive
  `fcntl.flock` on `model_dir/.lock` (a worker other than the chief of a
  multi-worker job on `model_dir/.worker_<i>.lock`), with its pid inside. A
  second trainer is refused, naming the holder's pid. The kernel releases
  the lock when its holder dies, so the lock of a killed trainer is taken
  over (and said so). Object stores (`gs://...`) have no locks: there the
  rule is not enforced.
- **A resume keeps the model and the data.** With a checkpoint in the
  directory, `task.name`, the keys under `task.params` and `task.data`,
  `task.seed` and `runtime.mixed_precision_dtype` must equal those of the
  saved `config.yaml` (a `task.params` key set in only one of them counts
  as a change); the check runs before `config.yaml` is rewritten, so a
  refused resume leaves it as it was. Optimizer and trainer keys may change
  (the trainer says how the learning-rate schedule changes). A config.yaml
  from before `task.params` (char_lm keys under `task.model` and
  `task.data`) is read with its keys at their new places.

Imports no TensorFlow (local paths use the os module; other paths
`tf.io.gfile`, imported when first needed).
"""

import errno
import fcntl
import os

import yaml

from tf_adamw.train import config as config_lib

CONFIG_FILE = "config.yaml"
# What a checkpoint was trained on: a resume must not change these.
MODEL_DATA_PREFIXES = ("task.params.", "task.data.")
MODEL_DATA_KEYS = ("task.name", "task.seed", "runtime.mixed_precision_dtype")
# The task's own keys: the task may have defaults for keys a config leaves
# out, so a key that appears or disappears is a change too.
PARAMS_PREFIX = "task.params."
# What the warmup + cosine learning-rate schedule is made of.
SCHEDULE_KEYS = ("trainer.train_steps", "task.optimizer.learning_rate",
                 "task.optimizer.warmup_steps",
                 "task.optimizer.end_learning_rate_ratio")


class RunDirError(RuntimeError):
    """The model directory cannot be used by this run (message: one line)."""


def is_local(path):
    return "://" not in os.fspath(path)


def _gfile():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile


def _read_text(path):
    """The file's text, or None if it does not exist."""
    if is_local(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None
    gfile = _gfile()
    if not gfile.exists(path):
        return None
    with gfile.GFile(path, "r") as f:
        return f.read()


def write_config(model_dir, config):
    """Writes `config.yaml` atomically (workers read it while it is written)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    temporary = f"{path}.tmp-{os.getpid()}"
    text = config_lib.to_yaml(config)
    if is_local(path):
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
        return
    gfile = _gfile()
    with gfile.GFile(temporary, "w") as f:
        f.write(text)
    gfile.rename(temporary, path, overwrite=True)


class Lock:
    """An exclusive `flock` on a file in the model directory, with our pid.

    Usage: `with Lock(path) as lock: ...`; `lock.took_over_from` is the pid
    of a trainer that died holding the file (None otherwise).
    """

    def __init__(self, path):
        self.path = path
        self.took_over_from = None
        self._file = None

    def __enter__(self):
        if not is_local(self.path):
            return self  # object stores have no locks
        # "a+": create if missing, never truncate a holder's pid before we
        # own the lock.
        f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            directory = os.path.dirname(self.path)
            raise RunDirError(
                f"{directory} is in use by another trainer (pid {holder}, "
                f"holding {os.path.basename(self.path)}); wait for it to "
                "finish, stop it, or use another --model_dir.") from None
        f.seek(0)
        previous = f.read().strip()
        if previous.isdigit() and int(previous) != os.getpid():
            self.took_over_from = int(previous)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc_info):
        if self._file is not None:
            # Empty while still locked: the next trainer finds no pid of a
            # trainer that ended cleanly.
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        return False


def lock_path(model_dir, chief, task_id):
    """The chief locks `.lock`; other workers of its job their own file."""
    name = ".lock" if chief else f".worker_{task_id}.lock"
    return os.path.join(model_dir, name)


def saved_config(model_dir):
    """The flattened `config.yaml` of the run in `model_dir`, or None."""
    path = os.path.join(model_dir, CONFIG_FILE)
    text = _read_text(path)
    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())  # one line
        raise RunDirError(f"{path} is not valid YAML ({problem}); it records "
                          "the run's model and data: restore it, or use "
                          "another --model_dir.") from None
    if not isinstance(data, dict):
        return None
    return _upgrade(config_lib.flatten(data))


def _upgrade(saved):
    """A config.yaml from before `task.name`/`task.params`: the char_lm keys
    at their new places (that run's task was char_lm)."""
    if "task.name" in saved:
        return saved
    upgraded = {config_lib.MOVED_KEYS.get(k, k): v for k, v in saved.items()}
    upgraded["task.name"] = config_lib.DEFAULT_TASK
    return upgraded


def _is_model_data_key(key):
    return key.startswith(MODEL_DATA_PREFIXES) or key in MODEL_DATA_KEYS


def _model_data_changes(saved, new):
    """`key saved -> new` for each model/data key that differs.

    A key missing from the saved config is not compared (a key added to
    the trainer since), except under `task.params`."""
    def show(values, key):
        return repr(values[key]) if key in values else "(unset)"

    keys = list(new) + [k for k in saved
                        if k.startswith(PARAMS_PREFIX) and k not in new]
    changes = []
    for key in keys:
        if not _is_model_data_key(key):
            continue
        if key.startswith(PARAMS_PREFIX):
            differs = (key in saved) != (key in new) or (
                saved.get(key) != new.get(key))
        else:
            differs = key in saved and saved[key] != new[key]
        if differs:
            changes.append(f"{key} {show(saved, key)} -> {show(new, key)}")
    return changes


def check_resume(model_dir, config, checkpoint_step):
    """Refuses a resume that would not continue the run in `model_dir`.

    Args:
        model_dir: the run directory.
        config: the new, validated `Config`.
        checkpoint_step: the newest checkpoint's step, None without one.

    Returns:
        The saved config (flattened) when there is a checkpoint to resume
        from, else None.

    Raises:
        RunDirError: a model/data key differs from the saved config, or
            the checkpoint is past `trainer.train_steps`.
    """
    if checkpoint_step is None:
        return None  # nothing to continue: a fresh start
    saved = saved_config(model_dir)
    new = config_lib.flatten(config_lib.to_dict(config))
    if saved is not None:
        changed = _model_data_changes(saved, new)
        if changed:
            raise RunDirError(
                f"{model_dir} holds a run with another model/data config "
                f"(saved in {CONFIG_FILE} -> now): {'; '.join(changed)}. A "
                "checkpoint only continues the run it came from: use the "
                "saved values, or another --model_dir.")
    train_steps = config.trainer.train_steps
    if checkpoint_step > train_steps:
        raise RunDirError(
            f"{model_dir} holds a checkpoint at step {checkpoint_step}, past "
            f"trainer.train_steps={train_steps}: set --train_steps to "
            f"{checkpoint_step} or more, or use another --model_dir.")
    return saved


def schedule_change(saved, config, step, learning_rate):
    """A line saying how the learning-rate schedule changes, or None.

    Args:
        saved: the saved config (flattened), or None.
        config: the new `Config`.
        step: the step the run resumes from.
        learning_rate: `learning_rate(config, step)`: the schedule's value
            for the update after `step` updates.
    """
    if not saved:
        return None
    new = config_lib.flatten(config_lib.to_dict(config))
    changed = [key for key in SCHEDULE_KEYS
               if key in saved and saved[key] != new[key]]
    if not changed:
        return None
    # The new config with the saved schedule: the schedule this run's
    # checkpoint was trained with.
    data = config_lib.to_dict(config)
    for key in changed:
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[leaf] = saved[key]
    try:
        old_config = config_lib.from_dict(data, CONFIG_FILE)
    except config_lib.ConfigError:
        return None  # a saved value of the wrong type: nothing to compare
    before = learning_rate(old_config, step)
    after = learning_rate(config, step)
    what = ", ".join(f"{key} {saved[key]} -> {new[key]}" for key in changed)
    line = f"{what}: "
    if "trainer.train_steps" in changed:
        line += (f"the cosine decay now ends at step {new['trainer.train_steps']}"
                 f" instead of {saved['trainer.train_steps']}; ")
    return (line + f"the learning rate at step {step + 1} (the first step of "
            f"this run) changes from {before:.3e} to {after:.3e}.")
