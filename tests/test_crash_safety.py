"""Crash safety with `tf.train.CheckpointManager` and `restore_latest_good`.

- A training process (tests/crash_worker.py, a checkpoint after every step)
  is SIGKILLed at random points, at least once inside `manager.save`, and
  once its newest checkpoint is truncated behind its back. Each restart
  resumes from the newest complete checkpoint (the previous one when the
  newest is damaged); the end state equals an uninterrupted run bit for bit.
- In process: a truncated, corrupted or partly deleted checkpoint is detected
  with a warning naming the damaged file, the previous checkpoint is
  restored, and nothing on disk is deleted or changed; with no intact
  checkpoint left, a clear error lists every file instead of starting over.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import tensorflow as tf

import crash_worker
import tf_adamw

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "crash_worker.py")
TOTAL_STEPS = 30
LAUNCH_TIMEOUT = 120  # seconds; a launch takes ~5 s on 2 idle cores
DATA = ".data-00000-of-00001"

# ----------------------------------------------------------------------------
# In process: damaged checkpoints.


def _make(directory):
    """A model, optimizer, manager; `values()` is the state to compare."""
    model = tf.Module(name="model")
    model.v = tf.Variable(np.linspace(-1, 1, 300, dtype=np.float32))
    opt = tf_adamw.AdamW(learning_rate=0.1, use_ema=True)
    opt.build([model.v])
    checkpoint = tf.train.Checkpoint(model=model, optimizer=opt)
    manager = tf.train.CheckpointManager(checkpoint, str(directory),
                                         max_to_keep=3)

    def step():
        opt.apply_gradients([(model.v - 0.5, model.v)])

    def values():
        return [model.v.numpy()] + [v.numpy() for v in opt.variables]

    return checkpoint, manager, step, values


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A directory with ckpt-1..3 (after 1, 2, 3 steps) and their values."""
    directory = tmp_path_factory.mktemp("saved") / "ckpts"
    _, manager, step, values = _make(directory)
    by_number = {}
    for n in (1, 2, 3):
        step()
        manager.save(checkpoint_number=n)
        by_number[n] = values()
    return directory, by_number


def _snapshot(directory):
    """Every file under `directory` with its bytes: "nothing is lost"."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {
    "truncated_data": (DATA, _truncate),
    "corrupted_data": (DATA, _flip_byte),
    "deleted_data": (DATA, os.remove),
    "deleted_index": (".index", os.remove),
    "truncated_index": (".index", lambda p: _truncate(p, keep=0.1)),
}


def _assert_values_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("pass_manager", [True, False],
                         ids=["manager", "directory"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
        saved, tmp_path, damage, pass_manager):
    source, by_number = saved
    directory = tmp_path / "ckpts"
    shutil.copytree(source, directory)
    suffix, damage_fn = DAMAGE[damage]
    damaged_file = str(directory / f"ckpt-3{suffix}")
    damage_fn(damaged_file)
    before = _snapshot(directory)

    checkpoint, manager, _, values = _make(directory)
    with pytest.warns(RuntimeWarning) as record:
        path = tf_adamw.restore_latest_good(
            checkpoint, manager if pass_manager else str(directory))
    messages = [str(w.message) for w in record]
    assert any(repr(damaged_file) in m for m in messages), messages
    assert path == str(directory / "ckpt-2")
    _assert_values_equal(values(), by_number[2])
    assert _snapshot(directory) == before, "restore must not touch the disk"


def test_training_on_after_a_fallback_keeps_every_good_checkpoint(saved,
                                                                  tmp_path):
    """The damaged ckpt-3 is overwritten by the next save of step 3; ckpt-1
    and ckpt-2 are still there and still restore."""
    source, by_number = saved
    directory = tmp_path / "ckpts"
    shutil.copytree(source, directory)
    _truncate(str(directory / f"ckpt-3{DATA}"))
    checkpoint, manager, step, values = _make(directory)
    with pytest.warns(RuntimeWarning, match="ckpt-3"):
        tf_adamw.restore_latest_good(checkpoint, manager)
    step()
    manager.save(checkpoint_number=3)
    _assert_values_equal(values(), by_number[3])  # deterministic

    checkpoint, _, _, values = _make(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ckpt-3 is intact again
        path = tf_adamw.restore_latest_good(checkpoint, str(directory))
    assert path == str(directory / "ckpt-3")
    _assert_values_equal(values(), by_number[3])
    for n in (1, 2):
        checkpoint, _, _, values = _make(directory)
        checkpoint.restore(str(directory / f"ckpt-{n}")).assert_consumed()
        _assert_values_equal(values(), by_number[n])


def test_no_intact_checkpoint_is_an_error_naming_every_file(saved, tmp_path):
    source, _ = saved
    directory = tmp_path / "ckpts"
    shutil.copytree(source, directory)
    for n in (1, 2, 3):
        _flip_byte(str(directory / f"ckpt-{n}{DATA}"))
    checkpoint, manager, _, _ = _make(directory)
    with pytest.warns(RuntimeWarning):
        with pytest.raises(ValueError, match="No intact checkpoint") as info:
            tf_adamw.restore_latest_good(checkpoint, manager)
    for n in (1, 2, 3):
        assert repr(str(directory / f"ckpt-{n}{DATA}")) in str(info.value)
        assert "Checksum does not match" in str(info.value)


def test_no_checkpoint_is_a_fresh_start(tmp_path):
    checkpoint, manager, _, _ = _make(tmp_path / "empty")
    assert tf_adamw.restore_latest_good(checkpoint, manager) is None
    assert tf_adamw.restore_latest_good(checkpoint, str(tmp_path)) is None
    assert tf_adamw.restore_latest_good(
        checkpoint, str(tmp_path / "not" / "created")) is None


def test_lost_state_file_uses_the_checkpoints_on_disk(saved, tmp_path):
    source, by_number = saved
    directory = tmp_path / "ckpts"
    shutil.copytree(source, directory)
    os.remove(directory / "checkpoint")
    checkpoint, manager, _, values = _make(directory)
    with pytest.warns(RuntimeWarning, match="found on disk"):
        path = tf_adamw.restore_latest_good(checkpoint, manager)
    assert path == str(directory / "ckpt-3")
    _assert_values_equal(values(), by_number[3])


def test_restore_latest_good_rejects_misuse(saved):
    source, _ = saved
    other = tf.train.Checkpoint(model=tf.Module())
    other.model.w = tf.Variable([1.0, 2.0])  # not in the checkpoint
    with pytest.raises(ValueError, match="does not match the objects"):
        tf_adamw.restore_latest_good(other, str(source))
    with pytest.raises(TypeError, match="`manager_or_directory`"):
        tf_adamw.restore_latest_good(other, 3)


def _mismatched(kind, strategy):
    """A model + optimizer that does not match `saved`'s checkpoints, after
    one step of its own; and a function reading all its state."""
    with strategy.scope():
        model = tf.Module(name="model")
        model.v = tf.Variable(np.linspace(1, 2, 300 if kind != "shape" else
                                          299, dtype=np.float32))
        variables = [model.v]
        if kind == "extra_variable":
            model.w = tf.Variable([3.0, 4.0])
            variables.append(model.w)
        opt = tf_adamw.AdamW(learning_rate=0.1, use_ema=True,
                             amsgrad=kind == "amsgrad")
        opt.build(variables)
    opt.apply_gradients([(v * 0.5, v) for v in variables])
    checkpoint = tf.train.Checkpoint(model=model, optimizer=opt)

    def values():
        return [np.array(c.numpy()) for v in variables + opt.variables
                for c in getattr(v, "values", (v,))]

    return checkpoint, values


@pytest.mark.parametrize("kind", ["shape", "extra_variable", "amsgrad"])
@pytest.mark.parametrize("replicas", [1, 4])
def test_a_mismatched_checkpoint_is_refused_before_anything_changes(
        saved, kind, replicas, mirrored_strategy):
    """Another shape, a variable the checkpoint lacks, AMSGrad slots it
    lacks: refused, and every variable, slot and counter (every replica's
    copy) is as it was."""
    source, _ = saved
    strategy = (mirrored_strategy if replicas == 4
                else tf.distribute.get_strategy())
    checkpoint, values = _mismatched(kind, strategy)
    before = values()
    with pytest.raises(ValueError, match="nothing was restored"):
        tf_adamw.restore_latest_good(checkpoint, str(source))
    for got, want in zip(values(), before):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------
# A real process, SIGKILLed at random points.


def _launch(directory, kill=None, out=None):
    """Runs the worker until it ends, or SIGKILLs it.

    Args:
        kill: None, or `(event, count, delay)`: `delay` seconds after the
            worker's `count`-th line starting with `event`, SIGKILL it.

    Returns:
        (returncode, the worker's stdout lines, its stderr).
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([REPO] + sys.path))
    cmd = [sys.executable, "-u", WORKER, str(directory), str(TOTAL_STEPS)]
    if out:
        cmd.append(f"--out={out}")
    err_path = str(directory) + ".stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env)
        # A hung worker must not hang the suite.
        watchdog = threading.Timer(LAUNCH_TIMEOUT, proc.kill)
        watchdog.start()
        lines, seen = [], 0
        try:
            for line in proc.stdout:
                lines.append(line.strip())
                if kill and line.startswith(kill[0] + " "):
                    seen += 1
                    if seen == kill[1]:
                        threading.Event().wait(kill[2])
                        proc.send_signal(signal.SIGKILL)
                        break
            lines.extend(proc.stdout.read().splitlines())
            proc.wait()
        finally:
            watchdog.cancel()
    with open(err_path) as f:
        return proc.returncode, lines, f.read()


def _number(prefix):
    return int(prefix.rsplit("-", 1)[1]) if prefix else 0


def _restored(lines):
    """(prefix or None, step) from the worker's first line."""
    words = lines[0].split()
    assert words[0] == "restored", lines[:3]
    return (None if words[1] == "None" else words[1]), int(words[-1])


@pytest.mark.multiprocess
def test_sigkill_at_random_points_resumes_bit_identically(tmp_path):
    rng = random.Random(1234)
    directory = tmp_path / "run"
    want = crash_worker.train(TOTAL_STEPS)

    # Kills right after "save-begin" land inside a save (a save takes tens of
    # ms); kills after "step" land anywhere in a step or the save after it.
    plan = [("save-begin", rng.randint(2, 4), rng.uniform(0, 0.004)),
            ("step", rng.randint(2, 4), rng.uniform(0, 0.05)),
            ("save-begin", rng.randint(2, 4), rng.uniform(0, 0.004))]
    kills = []
    expected = None  # the newest complete checkpoint when the worker starts
    while plan:
        code, lines, stderr = _launch(directory, kill=plan.pop(0))
        assert code == -signal.SIGKILL, (code, lines[-5:], stderr[-3000:])
        assert _restored(lines) == (expected, _number(expected)), lines[:2]
        expected = tf.train.latest_checkpoint(str(directory))
        events = [l.split() for l in lines if l.startswith("save-")]
        last_event, last_number = events[-1][0], int(events[-1][1])
        # Killed inside `manager.save(n)` before it recorded checkpoint n.
        in_save = last_event == "save-begin" and (
            _number(expected) == last_number - 1)
        kills.append((lines[-1], expected, in_save))
        if len(kills) < 6 and not any(k[2] for k in kills) and not plan:
            plan.append(("save-begin", 1, 0.0))  # until one lands in a save
    print("kills (last line, newest checkpoint, inside a save):", kills)
    assert any(in_save for _, _, in_save in kills), kills

    # The newest checkpoint is damaged behind the worker's back: it resumes
    # from the one before, warning about the file, and still ends identical.
    damaged = expected + DATA
    _truncate(damaged)
    previous = tf.train.get_checkpoint_state(
        str(directory)).all_model_checkpoint_paths[-2]
    out = tmp_path / "final.npz"
    code, lines, stderr = _launch(directory, out=out)
    assert code == 0, (lines[-5:], stderr[-3000:])
    assert _restored(lines) == (previous, _number(previous)), lines[:2]
    assert "Skipping a damaged checkpoint" in stderr and damaged in stderr
    assert lines[-1] == "done"

    with np.load(out) as got:
        assert sorted(got.files) == sorted(want)
        different = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not different, f"not bit-identical after {kills}: {different}"
    assert int(want["step"]) == TOTAL_STEPS
