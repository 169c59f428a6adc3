"""End-to-end tests of the trainer (`python -m tf_adamw.train`).

In-process runs share the pytest process's 4 logical CPUs (conftest.py): the
one-device config uses the default strategy, the mirrored config reuses the
4 CPUs that already exist. Subprocesses (marked `multiprocess`): the
multi-worker job, the CLI's TPU failure (its stderr), a run stopped by
SIGTERM, and a process holding a model directory's lock. Runs are shortened
with `--params_override`-style overrides; most use a tiny model. Tests over
~20 s are marked `slow` (outside the Bazel fast subset, like `multiprocess`).
"""

import json
import os
import shutil
import signal
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
from tf_adamw.train import rundir
from tf_adamw.train import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tpu_configs")
TINY = ("task.params.d_model=32,task.params.num_layers=1,"
        "task.params.num_heads=2,task.params.corpus_chars=20000,"
        "task.params.eval_corpus_chars=4000,task.params.eval_batches=1,"
        "task.optimizer.warmup_steps=2")
TPU_CONFIGS = ["tpu_v4_8_bf16", "tpu_v5e_8_bf16", "tpu_v5p_128_bf16"]


def _config(name, override, model_dir, **kwargs):
    return config_lib.load(os.path.join(CONFIGS, name + ".yaml"), override,
                           model_dir=str(model_dir), **kwargs)


def _assert_artifacts(model_dir, final_step):
    """Checkpoints, TensorBoard, both SavedModels and the PNG are there;
    the final eval is logged and the serving export holds the weights its
    serving_weights.json names."""
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    latest = tf.train.latest_checkpoint(ckpt_dir)
    assert latest and latest.endswith(f"ckpt-{final_step}")
    assert os.listdir(os.path.join(model_dir, "train"))  # event files
    png = os.path.join(model_dir, "loss_curve.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 5000
    rows = [json.loads(l) for l in open(
        os.path.join(model_dir, "metrics.jsonl"))]
    # One training row per logged step, one eval row per evaluated step.
    for kind in ("loss", "eval/loss"):
        steps = [r["step"] for r in rows if kind in r]
        assert steps == sorted(set(steps)) and steps[-1] == final_step, rows

    # Serving SavedModel: tokens -> logits, with the weights it says.
    serving = tf.saved_model.load(os.path.join(model_dir, "export", "serving"))
    tokens = tf.constant(data_lib.encode("the cat sees")[None, :])
    out = serving.signatures["serving_default"](tokens=tokens)
    assert out["logits"].shape == (1, 12, data_lib.VOCAB_SIZE)
    assert np.isfinite(out["logits"].numpy()).all()
    reader = tf.train.load_checkpoint(latest)
    average = reader.get_tensor(
        "optimizer/_averages/0/.ATTRIBUTES/VARIABLE_VALUE")
    live = reader.get_tensor("model/embeddings/.ATTRIBUTES/VARIABLE_VALUE")
    assert not np.array_equal(average, live)
    with open(os.path.join(model_dir, "export",
                           "serving_weights.json")) as f:
        info = json.load(f)
    assert info["checkpoint"] == latest
    assert {k: info[k] for k in ("eval/loss", "eval/loss_ema")} == {
        k: rows[-1][k] for k in ("eval/loss", "eval/loss_ema")}
    best = ("ema" if info["eval/loss_ema"] < info["eval/loss"] else "raw")
    assert info["weights"] == best and info["export_weights"] == "best"
    np.testing.assert_array_equal(serving.model.embeddings.numpy(),
                                  average if best == "ema" else live)

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
    assert [row["step"] for row in result.evals] == [75]
    assert result.exports["summary"].startswith("Sample (greedy): 'the ")


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
    assert "MirroredStrategy with 4 replicas, bfloat16" in out
    assert "step 10/10 | loss" in out and "steps/s | ETA" in out
    assert result.final_step == 10
    assert all(np.isfinite(r["loss"]) for r in result.history)
    _assert_artifacts(str(tmp_path), 10)


def test_resume_after_interruption_continues_from_the_checkpoint(
        tmp_path, capsys):
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
    # A crash in the middle of writing a row leaves a torn last line: the
    # resume skips it with a warning (it used to fail on every resume).
    with open(os.path.join(tmp_path, "metrics.jsonl"), "a") as f:
        f.write('{"step": 20, "loss": 3.1')
    capsys.readouterr()

    result = loop.train(_config("cpu_local", override, tmp_path))
    assert "metrics.jsonl line 4 is not a metrics row" in (
        capsys.readouterr().err)
    assert result.start_step == 10 and result.final_step == 20
    resumed = {r["step"]: r["loss"] for r in result.history}
    assert sorted(resumed) == [15, 20]
    # The same batches from the same restored state: steps 11-15 repeat
    # exactly what the interrupted run computed.
    assert resumed[15] == pytest.approx(first[15], rel=1e-6)
    # metrics.jsonl keeps one row per step across the two runs.
    assert [r["step"] for r in loop_history(tmp_path)] == [5, 10, 15, 20]
    assert os.path.exists(os.path.join(tmp_path, "loss_curve.png"))

    capsys.readouterr()
    again = loop.train(_config("cpu_local", override, tmp_path))
    assert again.start_step == again.final_step == 20
    assert again.history == [] and again.already_complete
    out = capsys.readouterr().out
    assert "Run already complete: step 20/20" in out
    assert "tf_adamw.train:" not in out  # no strategy, no model built


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
    # The schedule's length is train_steps: extending the run stretches it.
    before = float(loop.make_schedule(_config(
        "cpu_local", override + ",trainer.train_steps=5", tmp_path))(5))
    after = float(loop.make_schedule(config)(5))
    assert (f"trainer.train_steps 5 -> 10: the cosine decay now ends at step "
            f"10 instead of 5; the learning rate at step 6 (the first step "
            f"of this run) changes from {before:.3e} to {after:.3e}.") in out
    assert after > before
    reader = tf.train.load_checkpoint(
        os.path.join(tmp_path, "checkpoints", "ckpt-10"))
    assert reader.get_tensor(
        "optimizer/_weight_decay/.ATTRIBUTES/VARIABLE_VALUE") == np.float32(
            0.05)


SHORT = (TINY + ",trainer.steps_per_loop=5,trainer.log_every_n_steps=5,"
         "trainer.checkpoint_every_n_steps=5,trainer.export_saved_models=false,"
         "trainer.loss_curve=false")


def _holder(lock_file):
    """A process holding `lock_file` the way a trainer does (no TF)."""
    code = ("import sys, time\n"
            "from tf_adamw.train import rundir\n"
            "lock = rundir.Lock(sys.argv[1]).__enter__()\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, lock_file], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.multiprocess
def test_one_trainer_per_model_dir_and_a_dead_holder_is_taken_over(
        tmp_path, capsys):
    config = _config("cpu_local", SHORT + ",trainer.train_steps=5", tmp_path)
    holder = _holder(os.path.join(tmp_path, ".lock"))
    try:
        with pytest.raises(rundir.RunDirError) as e:
            loop.train(config)
        message = str(e.value)
        assert f"in use by another trainer (pid {holder.pid}" in message
        assert "\n" not in message
        assert not os.path.exists(os.path.join(tmp_path, "config.yaml"))
    finally:
        holder.kill()  # dies holding it: its pid stays in the file
        holder.wait()
    capsys.readouterr()
    result = loop.train(config)
    assert result.final_step == 5
    assert (f"from pid {holder.pid}, a trainer that ended without releasing "
            "it.") in capsys.readouterr().out
    with open(os.path.join(tmp_path, ".lock")) as f:
        assert f.read() == ""  # released: no pid of a live trainer


def test_a_resume_keeps_the_model_and_data_config(tmp_path, capsys):
    loop.train(_config("cpu_local", SHORT + ",trainer.train_steps=5",
                       tmp_path))
    path = os.path.join(tmp_path, "config.yaml")
    with open(path, "rb") as f:
        saved = f.read()
    changed = (SHORT + ",trainer.train_steps=10,task.params.d_model=64,"
               "task.params.seq_len=32,runtime.mixed_precision_dtype=bfloat16")
    with pytest.raises(rundir.RunDirError) as e:
        loop.train(_config("cpu_local", changed, tmp_path))
    message = str(e.value)
    assert "\n" not in message
    for text in ("task.params.d_model 32 -> 64",
                 "task.params.seq_len 64 -> 32",
                 "runtime.mixed_precision_dtype 'float32' -> 'bfloat16'"):
        assert text in message
    assert "train_steps" not in message  # trainer keys may change
    with open(path, "rb") as f:
        assert f.read() == saved  # checked before config.yaml is written
    with pytest.raises(rundir.RunDirError, match="checkpoint at step 5, past "
                       "trainer.train_steps=3"):
        loop.train(_config("cpu_local", SHORT + ",trainer.train_steps=3,"
                           "task.optimizer.warmup_steps=1", tmp_path))
    with open(path, "rb") as f:
        assert f.read() == saved


def test_serving_export_carries_its_vocabulary_and_takes_shorter_inputs(
        tmp_path, capsys):
    """A client needs only the export: vocabulary, maximum length, signature.

    The run first ends without exports (as if killed while exporting); the
    re-run finds the training complete and writes only the exports.
    """
    loop.train(_config("cpu_local", SHORT + ",trainer.train_steps=5",
                       tmp_path / "run"))
    capsys.readouterr()
    result = loop.train(_config(
        "cpu_local", SHORT + ",trainer.train_steps=5,"
        "trainer.export_saved_models=true", tmp_path / "run"))
    assert result.already_complete and result.history == []
    assert "writing the missing exports" in capsys.readouterr().out
    # The export alone, moved away from the run that wrote it.
    export = str(tmp_path / "client" / "serving")
    shutil.copytree(result.exports["serving_dir"], export)
    shutil.rmtree(tmp_path / "run")

    loaded = tf.saved_model.load(export)
    vocabulary = [t.decode() for t in loaded.vocabulary().numpy()]
    with open(os.path.join(export, "assets", "vocab.txt"),
              encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == vocabulary
    assert loaded.vocabulary_file.asset_path.numpy().decode().startswith(
        export)
    assert len(vocabulary) == 48 and vocabulary[0] == "\n"
    maximum = int(loaded.max_sequence_length.numpy())
    assert maximum == 64
    ids = [vocabulary.index(c) for c in "the cat sees"]
    serve = loaded.signatures["serving_default"]
    out = serve(tokens=tf.constant([ids, ids], tf.int32))
    assert out["logits"].shape == (2, len(ids), 48)
    assert vocabulary[int(out["next_token"][0])] in vocabulary
    assert np.isfinite(out["logits"].numpy()).all()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="at most 64 positions"):
        serve(tokens=tf.zeros([1, maximum + 1], tf.int32))


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler (KeyboardInterrupt) during the test,
    whatever the process inherited: a job a shell starts in the background
    without job control (`.ci/run &`) starts with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_saves_the_current_step_and_a_second_one_stops_at_once(
        tmp_path, capfd, python_sigint_handler):
    config = _config("cpu_local", SHORT + ",trainer.train_steps=30,"
                     "trainer.checkpoint_every_n_steps=15", tmp_path)

    def ctrl_c_at_10(step):
        if step == 10:
            os.kill(os.getpid(), signal.SIGINT)

    result = loop.train(config, hooks=[ctrl_c_at_10])
    assert result.stopped_by == "SIGINT" and result.final_step == 10
    assert tf.train.latest_checkpoint(
        os.path.join(tmp_path, "checkpoints")).endswith("ckpt-10")
    captured = capfd.readouterr()  # the handler writes to file descriptor 2
    assert ("Stopped by SIGINT at step 10/30: saved checkpoint "
            f"{tmp_path}/checkpoints/ckpt-10.") in captured.out
    assert "SIGINT received" in captured.err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def ctrl_c_twice_at_15(step):
        if step == 15:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs between the two
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)

    with pytest.raises(KeyboardInterrupt):
        loop.train(config, hooks=[ctrl_c_twice_at_15])
    # Saved by the periodic checkpoint only: the second Ctrl-C does not wait.
    assert tf.train.latest_checkpoint(
        os.path.join(tmp_path, "checkpoints")).endswith("ckpt-15")


def _checkpoint_tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    # save_counter counts saves: the interrupted run made one more.
    return {key: reader.get_tensor(key)
            for key in reader.get_variable_to_shape_map()
            if not key.startswith("save_counter")}


_NOISE = ("WARNING: All log messages before absl", "I0000 ", "W0000 ",
          "E0000 ", "cuInit", "Traceback")


@pytest.mark.multiprocess
def test_sigterm_mid_run_saves_and_the_resume_is_bit_identical(tmp_path):
    # Evaluating every call (raw and EMA weights) must not change a bit.
    override = (SHORT + ",trainer.checkpoint_every_n_steps=20,"
                "trainer.eval_every_n_steps=5")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tf_adamw.train",
         "--config_file=tpu_configs/cpu_local.yaml",
         f"--params_override={override}", "--train_steps=60",
         f"--model_dir={tmp_path / 'interrupted'}"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        lines = []
        for line in proc.stdout:  # the first logged step: mid-run
            lines.append(line)
            if line.startswith("step "):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == 0, (out, err)
    stop = [l for l in out.splitlines() if l.startswith("Stopped by SIGTERM")]
    assert len(stop) == 1, out
    step = int(stop[0].split(" at step ")[1].split("/")[0])
    assert 5 <= step < 60
    assert f"saved checkpoint {tmp_path}/interrupted/checkpoints/ckpt-{step}" \
        in stop[0]
    # Quiet by default: no TensorFlow C++ lines, no cuInit "error".
    assert not [l for l in err.splitlines() if l.startswith(_NOISE)], err
    assert not [l for l in out.splitlines() if l.startswith(_NOISE)], out

    resumed = loop.train(_config("cpu_local", override + ","
                                 "trainer.train_steps=60",
                                 tmp_path / "interrupted"))
    assert resumed.start_step == step and resumed.final_step == 60
    straight = loop.train(_config("cpu_local", override + ","
                                  "trainer.train_steps=60",
                                  tmp_path / "straight"))
    a = _checkpoint_tensors(resumed.checkpoint)
    b = _checkpoint_tensors(straight.checkpoint)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


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


@pytest.mark.multiprocess
@pytest.mark.parametrize("verbose", [False, True])
def test_cli_reports_a_missing_tpu_in_one_quiet_line(tmp_path, verbose):
    """By default stderr holds the error line and nothing of TensorFlow's
    (no C++ log lines, no cuInit "error"); --verbose brings those back."""
    env = _env()
    del env["TF_CPP_MIN_LOG_LEVEL"]  # as a user runs it
    proc = subprocess.run(
        [sys.executable, "-m", "tf_adamw.train",
         "--config_file=tpu_configs/tpu_v4_8_bf16.yaml",
         f"--model_dir={tmp_path}"] + (["--verbose"] if verbose else []),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error = [l for l in proc.stderr.splitlines()
             if l.startswith("error: TPUNotFoundError: No TPU was found")]
    assert len(error) == 1, proc.stderr
    others = [l for l in proc.stderr.splitlines() if l not in error]
    if verbose:
        assert others, "--verbose shows TensorFlow's own log lines"
    else:
        assert not others, proc.stderr
        assert proc.stdout == ""


def _start_workers(model_dir, steps):
    """Both workers of multiworker_local_2.yaml (stderr into stdout)."""
    hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    procs = []
    for task in range(2):
        override = (TINY + f",trainer.train_steps={steps},"
                    "trainer.steps_per_loop=5,trainer.log_every_n_steps=5,"
                    "trainer.checkpoint_every_n_steps=10,"
                    f"runtime.worker_hosts={hosts},runtime.task_index={task}")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tf_adamw.train",
             "--config_file=tpu_configs/multiworker_local_2.yaml",
             f"--params_override={override}", f"--model_dir={model_dir}"],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    return procs


def _finish(procs, timeout=60, on_exit=None):
    """Waits for the workers (killing them at `timeout`); their outputs.

    `on_exit(task)` runs as soon as worker `task` has exited.
    """
    deadline = time.monotonic() + timeout
    seen = set()
    try:
        while len(seen) < len(procs) and time.monotonic() < deadline:
            for task, proc in enumerate(procs):
                if task not in seen and proc.poll() is not None:
                    seen.add(task)
                    if on_exit:
                        on_exit(task)
            time.sleep(0.02)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [proc.communicate()[0] for proc in procs]


def _sigterm_worker_1(model_dir, steps):
    """Starts both workers, SIGTERMs worker 1 once the chief has logged a
    step; checks both saved the same step and exited 0; returns the step."""
    procs = _start_workers(model_dir, steps)
    head = []
    for line in procs[0].stdout:
        head.append(line)
        if line.startswith("step "):
            procs[1].send_signal(signal.SIGTERM)
            break
    outputs = _finish(procs)
    outputs[0] = "".join(head) + outputs[0]
    stops = []
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        stops += [l.split("Stopped by SIGTERM at step ")[1].split(":")[0]
                  for l in out.splitlines() if "Stopped by SIGTERM" in l]
    assert len(stops) == 2 and stops[0] == stops[1], outputs
    assert "MultiWorkerMirroredStrategy with 2 replicas" in outputs[0]
    return int(stops[0].split("/")[0])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_multiworker_local_2_sigterm_resume_and_a_clean_end(tmp_path):
    """SIGTERM to one worker: both save the same step and exit 0. The
    resumed job ends like one device; the workers leave together."""
    # 1. SIGTERM to worker 1 only: both stop at the same step.
    step = _sigterm_worker_1(tmp_path, 20)
    assert 5 <= step < 20
    assert tf.train.latest_checkpoint(
        os.path.join(tmp_path, "checkpoints")).endswith(f"ckpt-{step}")

    # 2. The resumed job runs to the end.
    procs = _start_workers(tmp_path, 20)
    exports_at_exit = {}

    def exports_done(task):
        exports_at_exit[task] = os.path.exists(
            os.path.join(tmp_path, "export", "serving", "saved_model.pb"))

    reference = loop.train(_config(  # meanwhile, one device
        "cpu_local", TINY + ",trainer.train_steps=20,trainer.steps_per_loop=5,"
        "trainer.log_every_n_steps=5,trainer.export_saved_models=false,"
        "trainer.loss_curve=false", tmp_path / "one_device"))
    outputs = _finish(procs, on_exit=exports_done)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        assert f"Resumed from {tmp_path}/checkpoints/ckpt-{step}" in out
        # No "tasks have crashed" (or anything else) from TensorFlow.
        assert not [l for l in out.splitlines() if l.startswith(_NOISE)
                    or "crashed" in l or "unhealthy" in l], out
    # Worker 1 left only after the chief's exports (the end barrier).
    assert exports_at_exit[1], "worker 1 exited before the chief finished"
    chief, worker = outputs
    strip = lambda l: l.split(" | ")[:4]  # noqa: E731
    assert [strip(l) for l in chief.splitlines() if l.startswith("step ")] == [
        strip(l.split("] ", 1)[1]) for l in worker.splitlines()
        if l.startswith("[worker 1] step ")]
    # Two workers, each with half of every global batch, equal one device,
    # across the interruption.
    assert [r["loss"] for r in loop_history(tmp_path)] == pytest.approx(
        [r["loss"] for r in reference.history], abs=2e-4)
    # Only the chief's checkpoints, summaries and exports remain.
    assert sorted(os.listdir(tmp_path)) == [
        ".lock", ".worker_1.lock", "checkpoints", "config.yaml", "export",
        "loss_curve.png", "metrics.jsonl", "one_device", "train"]
    _assert_artifacts(str(tmp_path), 20)
