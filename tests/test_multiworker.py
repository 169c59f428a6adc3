"""MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1.

Two launches of two workers each (a few seconds per launch on 2 cores):
an uninterrupted run that must equal one device, and a run in which a worker
is SIGKILLed mid-run, after which both restart from the last checkpoint and
must end bit-identical to the uninterrupted run.
"""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

import mwms_worker
from conftest import free_ports
from conftest import run_together
import tf_adamw

pytestmark = pytest.mark.multiprocess

CALLS = 12
WORKER = os.path.join(os.path.dirname(__file__), "mwms_worker.py")
TIMEOUT = 90


def _launch(model_dir, out=None, die_at_step=None):
    """Starts both workers; returns their (returncode, output) pairs."""
    ports = ",".join(str(p) for p in free_ports(2))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(__file__))] + sys.path))
    commands = []
    for task in range(2):
        cmd = [sys.executable, WORKER, str(task), ports, str(model_dir),
               str(CALLS)]
        if task == 0 and out:
            cmd.append(f"--out={out}")
        if task == 1 and die_at_step:
            cmd.append(f"--die_at_step={die_at_step}")
        commands.append(cmd)
    # Like a cluster manager: once a worker dies, stop the others (they
    # would block on the dead peer) so that all can restart together.
    return run_together(commands, [env, env], timeout=TIMEOUT)


def _single_device():
    kernel0, bias0 = mwms_worker.initial_values()
    variables = [tf.Variable(kernel0), tf.Variable(bias0)]
    optimizer = tf_adamw.AdamW(**mwms_worker.CONFIG)
    step = mwms_worker.make_train_step(tf.distribute.get_strategy(),
                                       variables, optimizer)
    for call in range(CALLS):
        step(*mwms_worker.data(call))
    return variables[0].numpy(), variables[1].numpy()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mwms_uninterrupted")
    out = directory / "final.npz"
    results = _launch(directory / "model", out=out)
    for code, output in results:
        assert code == 0, output
    return np.load(out)


def test_two_workers_equal_one_device(uninterrupted):
    kernel, bias = _single_device()
    np.testing.assert_allclose(uninterrupted["kernel"], kernel, rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(uninterrupted["bias"], bias, rtol=1e-6,
                               atol=1e-7)
    assert int(uninterrupted["iterations"]) == CALLS // 2


def test_killed_worker_resume_is_bit_identical(uninterrupted, tmp_path):
    model_dir = tmp_path / "model"
    out = tmp_path / "final.npz"
    # Worker 1 dies after call 6; the last checkpoint is at call 4.
    first = _launch(model_dir, die_at_step=6)
    assert first[1][0] == -9, first[1][1]
    assert first[0][0] != 0, "the surviving worker should fail or be killed"
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-4")

    second = _launch(model_dir, out=out)
    for code, output in second:
        assert code == 0, output
        assert "starts at call 4" in output, output
    resumed = np.load(out)
    for key in ("kernel", "bias", "iterations"):
        np.testing.assert_array_equal(resumed[key], uninterrupted[key],
                                      err_msg=key)
