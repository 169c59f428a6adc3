"""Runs README.md's code blocks as written, for tests/test_readme.py.

Every fenced block of README.md is one test. By the block's language:

- ```python: run in a fresh process (`sys.executable`), its working
  directory a new empty temporary directory, `PYTHONPATH` the repository
  root, `TF_CPP_MIN_LOG_LEVEL=2`. It must exit with status 0.
- ```sh (or bash, shell): run the same way with `bash -e -o pipefail`, the
  interpreter's directory first on `PATH` (so `python` is this one). Only
  for cheap commands without side effects outside the temporary directory;
  mark the others `skip`.
- no language, text, yaml, json, toml, console, output: output or data shown
  to the reader, never run. Any other language fails the test until it gets
  a runner here or a `skip`.

A block may be preceded (on the line right before its opening fence,
blank lines allowed in between) by one directive, an HTML comment that
GitHub does not show:

    <!-- readme-test: prelude NAME -->
        The block uses names the README elides on purpose (`dataset`,
        `strategy`, `make_model`, ...). PRELUDES[NAME] below defines them
        with tiny stand-ins and runs first, in the same process; its `check`
        (if any) runs after the block and asserts what the README says the
        block does. A prelude may also run an earlier README block first
        (`FromReadme`), when the block continues that one: this is how
        chained blocks are written down.
    <!-- readme-test: skip REASON -->
        Not run (a TPU, a package install, a minute of training...). The
        reason is required; the test reports it. Never use it to hide a
        failure.
    <!-- readme-test: usage -->
        A command synopsis with placeholders (`<name>`, `[--flag=N]`): runs
        the command with `--help` (which must exit 0) and checks that the
        help names every `--flag` and every `section.key=` of the block.

Anything else that starts with `<!-- readme-test` is an error, as is a
directive that is not right before a block.
"""

import ast
import dataclasses
import os
import re
import shlex
import sys

from conftest import free_ports
from conftest import run_together

# The source tree, also when this file is reached through a symlink (Bazel's
# runfiles): README.md is not among the test's data.
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
README = os.path.join(ROOT, "README.md")

PYTHON_LANGS = ("python", "py")
SH_LANGS = ("sh", "bash", "shell")
OUTPUT_LANGS = ("", "text", "yaml", "yml", "json", "toml", "console", "output")
TIMEOUT = 180  # seconds per process

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^`\s]*)[^`]*$")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(\S+)\s*(.*?)\s*-->\s*$")
DIRECTIVES = ("prelude", "skip", "usage")


class ReadmeError(ValueError):
    """README.md's blocks or directives are malformed."""


@dataclasses.dataclass(frozen=True)
class Block:
    heading: str  # the nearest heading above the block
    number: int  # 1 for the first block under that heading, then 2, ...
    lang: str
    code: str
    line: int  # README line of the opening fence
    directive: str = ""  # "", "prelude", "skip" or "usage"
    argument: str = ""  # the prelude's name or the skip's reason

    @property
    def test_id(self):
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{slug or 'top'}-{self.number}"

    @property
    def kind(self):
        if self.lang in PYTHON_LANGS:
            return "python"
        if self.lang in SH_LANGS:
            return "sh"
        if self.lang in OUTPUT_LANGS:
            return "output"
        return "unknown"

    def describe(self):
        """One line for the report: what the test does with the block."""
        where = f"README.md:{self.line} {self.heading!r} #{self.number} ({self.lang or 'no language'})"
        if self.directive == "skip":
            return f"{where}: SKIPPED: {self.argument}"
        if self.directive == "prelude":
            return f"{where}: run after prelude {self.argument!r}"
        if self.directive == "usage":
            return f"{where}: usage, checked against --help"
        if self.kind == "output":
            return f"{where}: output, not run"
        return f"{where}: run"


def parse(text):
    """The fenced blocks of a Markdown text, with their directives.

    Raises:
        ReadmeError: an unclosed fence, a malformed or misplaced directive, a
            skip without a reason, a prelude on a block that is not Python.
    """
    blocks = []
    heading = ""
    per_heading = {}
    pending = None  # (directive, argument, line) waiting for its block
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        fence = _FENCE.match(stripped)
        if fence:
            marker, lang = fence.group(1), fence.group(2).lower()
            indent = len(line) - len(line.lstrip())  # a fence in a list item
            start = i
            body = []
            i += 1
            while i < len(lines) and not (
                    lines[i].strip().startswith(marker)
                    and lines[i].strip().strip(marker[0]) == ""):
                body_line = lines[i]
                cut = len(body_line) - len(body_line.lstrip(" "))
                body.append(body_line[min(cut, indent):])
                i += 1
            if i == len(lines):
                raise ReadmeError(f"line {start + 1}: code block never closed")
            per_heading[heading] = per_heading.get(heading, 0) + 1
            directive, argument = pending[:2] if pending else ("", "")
            pending = None
            block = Block(heading, per_heading[heading], lang,
                          "\n".join(body) + "\n", start + 1, directive,
                          argument)
            _check_directive(block)
            blocks.append(block)
        elif stripped.startswith("<!--") and "readme-test" in stripped:
            match = _DIRECTIVE.match(stripped)
            if not match or match.group(1) not in DIRECTIVES:
                raise ReadmeError(
                    f"line {i + 1}: not a readme-test directive "
                    f"(one of {', '.join(DIRECTIVES)}): {stripped}")
            if pending:
                raise ReadmeError(f"line {pending[2]}: directive not right "
                                  "before a code block")
            pending = (match.group(1), match.group(2), i + 1)
        elif stripped:
            if pending:
                raise ReadmeError(f"line {pending[2]}: directive not right "
                                  "before a code block")
            heading_match = _HEADING.match(stripped)
            if heading_match:
                heading = heading_match.group(1)
        i += 1
    if pending:
        raise ReadmeError(f"line {pending[2]}: directive not right before a "
                          "code block")
    return blocks


def _check_directive(block):
    where = f"README.md line {block.line}"
    if block.directive == "skip" and not block.argument:
        raise ReadmeError(f"{where}: `skip` needs a reason")
    if block.directive == "prelude":
        if block.kind != "python":
            raise ReadmeError(f"{where}: preludes are for python blocks")
        if block.argument not in PRELUDES:
            raise ReadmeError(f"{where}: no prelude {block.argument!r} in "
                              f"tests/readme_harness.py (has: "
                              f"{', '.join(sorted(PRELUDES))})")
    if block.directive == "usage" and block.kind != "sh":
        raise ReadmeError(f"{where}: `usage` is for sh blocks")
    if block.directive == "usage" and block.argument:
        raise ReadmeError(f"{where}: `usage` takes no argument")
    if block.directive and block.directive != "skip" and block.kind == "output":
        raise ReadmeError(f"{where}: output blocks are not run")


def read_blocks():
    with open(README, encoding="utf-8") as f:
        return parse(f.read())


# ----------------------------------------------------------------------------
# Preludes: the names README.md elides, as tiny stand-ins.


@dataclasses.dataclass(frozen=True)
class FromReadme:
    """A README block (the `number`th under `heading`), run as a prelude
    part: the block being tested continues it."""

    heading: str
    number: int = 1


@dataclasses.dataclass(frozen=True)
class Prelude:
    doc: str
    # Run in order before the block: code, a function returning code (read
    # when the block runs), or FromReadme.
    parts: tuple
    check: str = ""  # code run after the block: what the README claims
    processes: int = 1  # > 1: a multi-worker job on 127.0.0.1 (see below)


_IMPORTS = """\
import numpy as np
import tensorflow as tf
import keras
import tf_adamw
"""

_MAKE_MODEL_32_10 = """\
def make_model():
    return keras.Sequential([keras.Input((32,)),
                             keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(10)])
"""

_MAKE_MODEL_4_3 = """\
def make_model():
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=1)),
        keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(seed=2)),
    ])
"""

_TRAINING_SAVEDMODEL = _IMPORTS + _MAKE_MODEL_4_3 + """\
# The batch `loaded.train_step(x, y)` trains on.
x = tf.random.stateless_normal([8, 4], seed=(1, 2))
y = tf.random.stateless_normal([8, 3], seed=(3, 4))
"""


def _trainer_tiny_override():
    """tests/test_train.py's `TINY`: the trainer tests' override that shrinks
    the default model and data (read, not imported: that module imports
    TensorFlow). One source, kept right by the trainer's own tests."""
    path = os.path.join(ROOT, "tests", "test_train.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "TINY"):
            return ast.literal_eval(node.value)
    raise ReadmeError(f"{path} no longer defines TINY: update the "
                      "`trained_run` prelude of tests/readme_harness.py")


# 5 steps of the default config with the tiny model: ~6 s.
_TINY_TRAINER_RUN = """\
import os, subprocess, sys
# Stands in for `make train`: the same config, a tiny model, 5 steps.
subprocess.run(
    [sys.executable, "-m", "tf_adamw.train",
     "--config_file=" + os.path.join(os.environ["README_TEST_ROOT"],
                                     "tpu_configs", "cpu_local.yaml"),
     "--params_override=" + TINY + ",trainer.train_steps=5,"
     "trainer.steps_per_loop=5,trainer.log_every_n_steps=5,"
     "trainer.checkpoint_every_n_steps=5,trainer.loss_curve=false",
     "--model_dir=runs/cpu_local"], check=True)
"""

PRELUDES = {
    "dataset": Prelude(
        "`dataset`: 2 batches of 8 (x [8, 32] float32, y [8] labels < 10).",
        ("""\
import tensorflow as tf
dataset = tf.data.Dataset.from_tensor_slices(
    (tf.random.normal([16, 32]),
     tf.random.uniform([16], 0, 10, dtype=tf.int32))).batch(8)
""",),
        check="assert int(optimizer.iterations) == 2\n"),
    "mirrored": Prelude(
        "The custom loop's imports; `make_model` (32 -> 10); `dataset`, "
        "512 unbatched examples; `steps = 2`.",
        (_IMPORTS + _MAKE_MODEL_32_10 + """\
dataset = tf.data.Dataset.from_tensor_slices(
    (tf.random.normal([512, 32]),
     tf.random.uniform([512], 0, 10, dtype=tf.int32)))
steps = 2
""",),
        check="assert optimizer.iterations.numpy() == steps\n"),
    "multiworker": Prelude(
        "Two workers on 127.0.0.1 (`WORKER_HOSTS`, `WORKER_INDEX` from the "
        "test), `model_dir` in the shared working directory, `make_model` "
        "(imports Keras when called: the block sets TF_CONFIG before "
        "TensorFlow is imported).",
        ("""\
import os
WORKER_HOSTS = os.environ["README_TEST_WORKER_HOSTS"].split(",")
WORKER_INDEX = int(os.environ["README_TEST_WORKER_INDEX"])
model_dir = os.path.abspath("model_dir")

def make_model():
    import keras
    return keras.Sequential([keras.Input((32,)), keras.layers.Dense(10)])
""",),
        # Every worker saves: the chief's checkpoint lands in model_dir,
        # the other worker's in its own directory (not shared with any
        # other job), and the chief's is what restore_latest_good finds.
        check="""\
assert strategy.num_replicas_in_sync == 2
saved = manager.save()
if WORKER_INDEX == 0:
    assert os.path.dirname(saved) == model_dir, saved
else:
    assert os.path.dirname(os.path.dirname(saved)) == model_dir, saved
""",
        processes=2),
    "checkpoint": Prelude(
        "`model`, a built `optimizer`, `checkpoint` and `manager` "
        "(directory `checkpoints`) holding one saved step; one more step "
        "after the save, which the restore undoes.",
        (_IMPORTS + _MAKE_MODEL_4_3 + """\
model = make_model()
optimizer = tf_adamw.AdamW(learning_rate=1e-3)
optimizer.build(model.trainable_variables)
checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
manager = tf.train.CheckpointManager(checkpoint, "checkpoints", max_to_keep=3)

def _step():
    optimizer.apply_gradients(
        [(tf.ones_like(v), v) for v in model.trainable_variables])

_step()
manager.save()
_step()
""",),
        check="""\
assert restored == manager.latest_checkpoint, restored
assert int(optimizer.iterations) == 1
"""),
    "training_savedmodel": Prelude(
        "The imports; `make_model` (4 -> 3); the batch `x`, `y`.",
        (_TRAINING_SAVEDMODEL,),
        # "continues bit-identically": the loaded step equals the live one.
        check="""\
trainer.train_step(x, y)  # the step `loaded` took in the block
assert loaded.train_step(x, y).numpy() == trainer.train_step(x, y).numpy()
"""),
    "distributed_resume": Prelude(
        "Continues the training-SavedModel block (which writes "
        "export/training): 2 logical CPUs, `strategy` a MirroredStrategy "
        "over them, `GLOBAL_BATCH = 8`, `dataset` 16 unbatched examples.",
        ("""\
import tensorflow as tf
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
""",
         _TRAINING_SAVEDMODEL,
         FromReadme("Training SavedModel (resume without the Python code)"),
         """\
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
GLOBAL_BATCH = 8
dataset = tf.data.Dataset.from_tensor_slices(
    (tf.random.stateless_normal([16, 4], seed=(5, 6)),
     tf.random.stateless_normal([16, 3], seed=(7, 8))))
"""),
        # "equals the single-device run": the export resumed on one device
        # with the module's own train_step, same batches. The slots, not
        # just the weights: Adam's step barely depends on the gradient's
        # scale, the moments do.
        check="""\
reference = Trainer()
tf_adamw.restore_training_variables("export/training", reference)
for rx, ry in dataset.batch(GLOBAL_BATCH):
    reference.train_step(rx, ry)
assert trainer.optimizer.iterations.numpy() == 2
for got, want in zip(trainer.model.variables + trainer.optimizer.variables,
                     reference.model.variables + reference.optimizer.variables):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5,
                               atol=1e-7, err_msg=got.name)
"""),
    "serving": Prelude(
        "`model` (4 -> 3) and an `optimizer` with `use_ema=True` after 3 "
        "steps; `evaluate(model)` prints a loss.",
        (_IMPORTS + _MAKE_MODEL_4_3 + """\
model = make_model()
optimizer = tf_adamw.AdamW(learning_rate=0.1, use_ema=True, ema_momentum=0.5)
optimizer.build(model.trainable_variables)
for _ in range(3):
    optimizer.apply_gradients(
        [(tf.ones_like(v), v) for v in model.trainable_variables])
_x = tf.ones([2, 4])

def evaluate(model):
    print("eval:", float(tf.reduce_mean(model(_x))))

_training_values = [v.numpy() for v in model.trainable_variables]
""",),
        # The training values are back; the export holds the EMA weights.
        check="""\
for v, before in zip(model.trainable_variables, _training_values):
    assert np.array_equal(v.numpy(), before), v.name
with tf_adamw.ema_weights(optimizer):
    want = model(_x).numpy()
served = tf.saved_model.load("export/serving")
got = served.signatures["serving_default"](x=_x)["y"].numpy()
np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
assert not np.allclose(got, model(_x).numpy())
"""),
    "trained_run": Prelude(
        "Runs the trainer with the default config shrunk to a tiny model "
        "and 5 steps into runs/cpu_local (~6 s), as `make train` would.",
        (lambda: f"TINY = {_trainer_tiny_override()!r}\n"
         + _TINY_TRAINER_RUN,)),
}


# ----------------------------------------------------------------------------
# Running.


def _find(blocks, heading, number):
    found = [b for b in blocks if b.heading == heading and b.number == number]
    if len(found) != 1:
        raise ReadmeError(f"prelude part: no block #{number} under heading "
                          f"{heading!r} in README.md")
    return found[0]


def python_script(block, blocks):
    """The script a python block runs as: its prelude's parts, the block,
    the prelude's check; each part under a comment naming where it is from.
    """
    parts = []
    if block.directive == "prelude":
        prelude = PRELUDES[block.argument]
        for part in prelude.parts:
            if isinstance(part, FromReadme):
                other = _find(blocks, part.heading, part.number)
                parts.append((f"README.md line {other.line} (block "
                              f"{other.test_id}, chained)", other.code))
            else:
                parts.append((f"prelude {block.argument!r} "
                              "(tests/readme_harness.py)",
                              part() if callable(part) else part))
    parts.append((f"README.md line {block.line} (the block)", block.code))
    if block.directive == "prelude" and PRELUDES[block.argument].check:
        parts.append((f"check of prelude {block.argument!r}",
                      PRELUDES[block.argument].check))
    return "".join(f"# ---- {name}\n{code.rstrip()}\n\n"
                   for name, code in parts)


def environment(extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
               README_TEST_ROOT=ROOT)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get(
        "PATH", "")
    env.update(extra or {})
    return env


def _numbered(text):
    return "\n".join(f"{n:4d}  {line}"
                     for n, line in enumerate(text.splitlines(), 1))


def _run_processes(commands, cwd, envs):
    return run_together(commands, envs, cwd=cwd, timeout=TIMEOUT)


def run_block(block, blocks, tmp_dir):
    """Runs one block in a new working directory under `tmp_dir`.

    Returns:
        None when it ran as the README says; else a message saying what
        failed, with the script and its output.
    """
    cwd = os.path.join(tmp_dir, "cwd")
    os.makedirs(cwd)
    if block.kind == "python":
        script = python_script(block, blocks)
        path = os.path.join(tmp_dir, "readme_block.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        processes = (PRELUDES[block.argument].processes
                     if block.directive == "prelude" else 1)
        extra = [{}]
        if processes > 1:
            hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(processes))
            extra = [{"README_TEST_WORKER_HOSTS": hosts,
                      "README_TEST_WORKER_INDEX": str(i)}
                     for i in range(processes)]
        results = _run_processes([[sys.executable, path]] * processes, cwd,
                                 [environment(e) for e in extra])
    elif block.directive == "usage":
        return check_usage(block, cwd)
    elif block.kind == "sh":
        script = block.code
        results = _run_processes(
            [["bash", "-e", "-o", "pipefail", "-c", script]], cwd,
            [environment()])
    else:
        raise ReadmeError(f"README.md line {block.line}: no runner for "
                          f"language {block.lang!r}: mark it "
                          "`<!-- readme-test: skip REASON -->`")
    failed = [(i, code, out) for i, (code, out) in enumerate(results)
              if code != 0]
    if not failed:
        return None
    outputs = "\n".join(
        f"---- process {i} (of {len(results)}) exit status {code}:\n"
        + "\n".join(out.splitlines()[-60:]) for i, code, out in failed)
    return (f"README.md line {block.line} ({block.test_id}) failed.\n"
            f"---- script:\n{_numbered(script)}\n{outputs}")


def check_usage(block, cwd):
    """A synopsis: `COMMAND --help` exits 0 and names the block's flags and
    config keys."""
    text = block.code.replace("\\\n", " ")
    command = []
    for token in shlex.split(text.splitlines()[0]):
        if token.startswith(("--", "[")):
            break
        command.append(sys.executable if token in ("python", "python3")
                       else token)
    results = _run_processes([command + ["--help"]], cwd, [environment()])
    code, output = results[0]
    if code != 0:
        return (f"README.md line {block.line}: `{' '.join(command)} --help` "
                f"exit status {code}:\n{output}")
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_]*)", block.code))
    keys = set(re.findall(r"\b([a-z_]+(?:\.[a-z_]+)+)=", block.code))
    missing = sorted(f for f in flags if not re.search(
        re.escape(f) + r"\b", output))
    missing += sorted(k for k in keys if k not in output)
    if missing:
        return (f"README.md line {block.line}: `{' '.join(command)} --help` "
                f"does not name {missing}:\n{output}")
    return None
