"""End-to-end tests of the trainer (`python -m tf_adamw.train`).

In-process runs share the pytest process's 4 logical CPUs (conftest.py): the
one-device config uses the default strategy, the mirrored config reuses the
4 CPUs that already exist. Only the multi-worker job (two processes) and the
CLI's TPU failure run in subprocesses. Runs are shortened with
`--params_override`-style overrides; most use a tiny model. The two longest
in-process runs are marked `slow` (outside the Bazel fast subset).
"""

import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tensorflow as tf

from conftest import free_ports
from tf_adamw.train import config as config_lib
from tf_adamw.train import data as data_lib
from tf_adamw.train import loop
from tf_adamw.train import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tpu_configs")
TINY = ("task.model.d_model=32,task.model.num_layers=1,task.model.num_heads=2,"
        "task.data.corpus_chars=20000,task.data.eval_corpus_chars=4000,"
        "task.data.eval_batches=1,task.optimizer.warmup_steps=2")
TPU_CONFIGS = ["tpu_v4_8_bf16", "tpu_v5e_8_bf16", "tpu_v5p_128_bf16"]


def _config(name, override, model_dir, **kwargs):
    return config_lib.load(os.path.join(CONFIGS, name + ".yaml"), override,
                           model_dir=str(model_dir), **kwargs)


def _assert_artifacts(model_dir, final_step):
    """Checkpoints, TensorBoard, both SavedModels and the PNG are there."""
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    latest = tf.train.latest_checkpoint(ckpt_dir)
    assert latest and latest.endswith(f"ckpt-{final_step}")
    assert os.listdir(os.path.join(model_dir, "train"))  # event files
    png = os.path.join(model_dir, "loss_curve.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 5000
    steps = [json.loads(l)["step"] for l in open(
        os.path.join(model_dir, "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == final_step

    # Serving SavedModel: tokens -> logits; its weights are the EMA averages.
    serving = tf.saved_model.load(os.path.join(model_dir, "export", "serving"))
    tokens = tf.constant(data_lib.encode("the cat sees")[None, :])
    out = serving.signatures["serving_default"](tokens=tokens)
    assert out["logits"].shape == (1, 12, data_lib.VOCAB_SIZE)
    assert np.isfinite(out["logits"].numpy()).all()
    reader = tf.train.load_checkpoint(latest)
    average = reader.get_tensor(
        "optimizer/_averages/0/.ATTRIBUTES/VARIABLE_VALUE")
    live = reader.get_tensor("model/embeddings/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_array_equal(serving.model.embeddings.numpy(), average)
    assert not np.array_equal(average, live)

    # Training SavedModel: a new step runs and counts.
    training = tf.saved_model.load(
        os.path.join(model_dir, "export", "training"))
    assert int(training.optimizer._iterations.numpy()) == final_step
    seq_len = training.model.positions.shape[0]
    x = tf.zeros([2, seq_len], tf.int32)
    result = training.train_step(x, x)
    assert np.isfinite(result["loss"].numpy())
    assert int(training.optimizer._iterations.numpy()) in (
        final_step, final_step + 1)  # + 0 while accumulating


@pytest.mark.slow
def test_default_config_loss_falls_and_leaves_every_artifact(tmp_path):
    """cpu_local.yaml as shipped, shortened to 75 steps."""
    config = _config(
        "cpu_local", "trainer.train_steps=75,trainer.log_every_n_steps=25,"
        "trainer.checkpoint_every_n_steps=25", tmp_path)
    result = loop.train(config)
    losses = [row["loss"] for row in result.history]
    assert result.start_step == 0 and result.final_step == 75
    assert len(losses) == 3
    # ln(48) = 3.87 at initialisation; the first window averages steps 1-25.
    assert losses[0] > 2.7
    assert losses[-1] < losses[0] - 0.8, losses
    assert losses[-1] < 2.1, losses
    for row in result.history:
        assert row["grad_norm"] > 0 and row["learning_rate"] > 0
        assert row["steps_per_sec"] > 0
    # The step-25 checkpoint was rotated in, max_to_keep=3 keeps all three.
    ckpts = tf.train.get_checkpoint_state(
        os.path.join(tmp_path, "checkpoints")).all_model_checkpoint_paths
    assert [p.rsplit("-", 1)[1] for p in ckpts] == ["25", "50", "75"]
    _assert_artifacts(str(tmp_path), 75)
    assert result.exports["eval_loss"] < 2.3
    assert result.exports["sample"].startswith("the ")


@pytest.mark.slow
def test_mirrored_4_cpus_bf16_accumulation_end_to_end(tmp_path, capsys):
    """cpu_mirrored_4.yaml on the 4 logical CPUs, bfloat16, accumulation."""
    config = _config(
        "cpu_mirrored_4", TINY + ",trainer.train_steps=10,"
        "trainer.steps_per_loop=5,trainer.log_every_n_steps=5,"
        "trainer.checkpoint_every_n_steps=5,"
        "runtime.mixed_precision_dtype=bfloat16,"
        "task.optimizer.gradient_accumulation_steps=2", tmp_path)
    result = loop.train(config)
    out = capsys.readouterr().out
    assert "MirroredStrategy with 4 replica(s), bfloat16" in out
    assert "step 10/10 | loss" in out and "steps/s | ETA" in out
    assert result.final_step == 10
    assert all(np.isfinite(r["loss"]) for r in result.history)
    _assert_artifacts(str(tmp_path), 10)


def test_resume_after_interruption_continues_from_the_checkpoint(tmp_path):
    override = (TINY + ",trainer.train_steps=20,trainer.steps_per_loop=5,"
                "trainer.log_every_n_steps=5,"
                "trainer.checkpoint_every_n_steps=10,"
                "trainer.export_saved_models=false")
    config = _config("cpu_local", override, tmp_path)

    class Preempted(Exception):
        pass

    def preempt_at_15(step):
        if step == 15:
            raise Preempted()

    with pytest.raises(Preempted):
        loop.train(config, hooks=[preempt_at_15])
    first = {r["step"]: r["loss"] for r in loop_history(tmp_path)}
    assert sorted(first) == [5, 10, 15]  # logged up to the interruption
    assert tf.train.latest_checkpoint(
        os.path.join(tmp_path, "checkpoints")).endswith("ckpt-10")

    result = loop.train(_config("cpu_local", override, tmp_path))
    assert result.start_step == 10 and result.final_step == 20
    resumed = {r["step"]: r["loss"] for r in result.history}
    assert sorted(resumed) == [15, 20]
    # The same batches from the same restored state: steps 11-15 repeat
    # exactly what the interrupted run computed.
    assert resumed[15] == pytest.approx(first[15], rel=1e-6)
    # metrics.jsonl keeps one row per step across the two runs.
    assert [r["step"] for r in loop_history(tmp_path)] == [5, 10, 15, 20]
    assert os.path.exists(os.path.join(tmp_path, "loss_curve.png"))

    again = loop.train(_config("cpu_local", override, tmp_path))
    assert again.start_step == again.final_step == 20
    assert again.history == []


def test_resume_applies_the_config_and_says_what_changed(tmp_path, capsys):
    """Hyperparameters come from the config, not the checkpoint; the
    trainer names each one that differs from the checkpoint's."""
    override = (TINY + ",trainer.steps_per_loop=5,trainer.log_every_n_steps=5,"
                "trainer.checkpoint_every_n_steps=5,"
                "trainer.export_saved_models=false,trainer.loss_curve=false")
    loop.train(_config("cpu_local", override + ",trainer.train_steps=5",
                       tmp_path))
    capsys.readouterr()
    config = _config("cpu_local", override + ",trainer.train_steps=10,"
                     "task.optimizer.weight_decay=0.05", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said by the trainer, not warned
        loop.train(config)
    out = capsys.readouterr().out
    assert "Config sets weight_decay=0.05 (the checkpoint had 0.1)." in out
    assert "beta_2" not in out  # unchanged values are not mentioned
    reader = tf.train.load_checkpoint(
        os.path.join(tmp_path, "checkpoints", "ckpt-10"))
    assert reader.get_tensor(
        "optimizer/_weight_decay/.ATTRIBUTES/VARIABLE_VALUE") == np.float32(
            0.05)


def loop_history(model_dir):
    from tf_adamw.train import artifacts  # pylint: disable=g-import-not-at-top
    return artifacts.read_history(os.path.join(model_dir, "metrics.jsonl"))


@pytest.mark.parametrize("name", TPU_CONFIGS)
def test_tpu_configs_fail_cleanly_without_a_tpu(name, tmp_path, monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    config = _config(name, "", tmp_path)
    with pytest.raises(runtime.TPUNotFoundError, match="No TPU was found"):
        loop.train(config)


def test_named_tpu_fails_cleanly_without_a_tpu(tmp_path):
    config = _config("tpu_v5p_128_bf16", "", tmp_path, tpu="my-v5p-slice")
    with pytest.raises(runtime.TPUNotFoundError,
                       match="No TPU was found.*'my-v5p-slice'"):
        loop.train(config)


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path),
                TF_CPP_MIN_LOG_LEVEL="2")


def test_cli_reports_a_missing_tpu_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tf_adamw.train",
         "--config_file=tpu_configs/tpu_v4_8_bf16.yaml",
         f"--model_dir={tmp_path}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "TPUNotFoundError: No TPU was found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.multiprocess
def test_multiworker_local_2_runs_two_processes(tmp_path):
    hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    procs = []
    for task in range(2):
        override = (TINY + ",trainer.train_steps=10,trainer.steps_per_loop=5,"
                    "trainer.log_every_n_steps=5,"
                    "trainer.checkpoint_every_n_steps=5,"
                    f"runtime.worker_hosts={hosts},runtime.task_index={task}")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tf_adamw.train",
             "--config_file=tpu_configs/multiworker_local_2.yaml",
             f"--params_override={override}", f"--model_dir={tmp_path}"],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 60
    # The same job on one device, here, while the workers start up.
    reference = loop.train(_config(
        "cpu_local", TINY + ",trainer.train_steps=10,trainer.steps_per_loop=5,"
        "trainer.log_every_n_steps=5,trainer.export_saved_models=false,"
        "trainer.loss_curve=false", tmp_path / "one_device"))
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(
                timeout=max(deadline - time.monotonic(), 1))
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    chief, worker = outputs
    assert "CollectiveAllReduceStrategy with 2 replica(s)" in chief
    chief_steps = [l for l in chief.splitlines() if l.startswith("step ")]
    worker_steps = [l.split("] ", 1)[1] for l in worker.splitlines()
                    if l.startswith("[worker 1] step ")]
    assert len(chief_steps) == 2
    # Both workers see the same global loss and gradient norm.
    strip = lambda l: l.split(" | ")[:4]  # noqa: E731
    assert [strip(l) for l in chief_steps] == [strip(l) for l in worker_steps]
    # Two workers, each with half of every global batch, equal one device.
    chief_losses = [float(l.split(" | ")[1].split()[1]) for l in chief_steps]
    assert chief_losses == pytest.approx(
        [r["loss"] for r in reference.history], abs=2e-4)
    # Only the chief's checkpoints, summaries and exports remain.
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoints", "config.yaml", "export", "loss_curve.png",
        "metrics.jsonl", "one_device", "train"]
    _assert_artifacts(str(tmp_path), 10)
