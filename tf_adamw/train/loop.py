"""The custom training loop.

    build the task (`task.name`) -> setup_devices -> lock the model
    directory -> check a resume against the saved config.yaml (or stop:
    already complete) -> strategy -> the task's model + AdamW under
    strategy.scope() -> restore the newest good checkpoint -> the task's
    distributed dataset from the restored step -> repeat { one tf.function
    call = steps_per_loop updates } -> log / TensorBoard / checkpoint, or
    save and stop on SIGTERM / SIGINT -> evaluate (every
    eval_every_n_steps, and at the end) -> export SavedModels, loss curve.

One optimizer update is `gradient_accumulation_steps` micro-batches of
`global_batch_size` examples. In each micro-step every replica computes the
gradient of its share of the loss (the sum of the task's per-example losses
scaled by 1 / (global batch x elements per example)), the replica function
sums the gradients across replicas once (`all_reduce`), takes the global
norm of that sum for the logs, and hands the summed gradients to
`tf_adamw.AdamW` with `skip_gradients_aggregation=True` (so it does not sum
them again). Nothing is all-reduced inside a `tf.cond`.
"""

import dataclasses
import gc
import os
import shutil
import time
import typing
import warnings

import tensorflow as tf
from tensorflow.core.framework import summary_pb2

import tf_adamw
from tf_adamw import hyperparameters
from tf_adamw.train import artifacts
from tf_adamw.train import config as config_lib
from tf_adamw.train import evaluation
from tf_adamw.train import rundir
from tf_adamw.train import runtime as runtime_lib
from tf_adamw.train import schedule as schedule_lib
from tf_adamw.train import signals
from tf_adamw.train import task as task_lib


def _scalar_summary(name, value, step):
    """A TensorBoard scalar, written with TF core ops only.

    `tf.summary.scalar` lives in the `tensorboard` package, which TF 2.21 no
    longer installs; this writes the same record (plugin "scalars") with
    `tf.summary.write`, so TensorBoard shows it without the trainer needing
    TensorBoard installed.
    """
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name="scalars"))
    tf.summary.write(name, tf.constant(value, tf.float32), step=step,
                     metadata=metadata)


def _say(message):
    print(message, flush=True)


def _duration(seconds):
    seconds = int(round(max(seconds, 0)))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


@dataclasses.dataclass
class Result:
    """What `train` reports back (also used by the tests)."""
    start_step: int
    final_step: int
    history: list  # rows logged by this call: step, loss, lr, grad_norm, ...
    model_dir: str
    checkpoint: str
    exports: dict
    wall_seconds: float
    # "SIGTERM" / "SIGINT" when a signal stopped the run (after saving a
    # checkpoint of `final_step`; no exports), else None.
    stopped_by: typing.Optional[str] = None
    # True when the model directory held the finished run already.
    already_complete: bool = False
    # Eval rows of this call: step, eval/loss (and eval/loss_ema).
    evals: list = dataclasses.field(default_factory=list)


def make_schedule(config):
    """The config's warmup + cosine learning-rate schedule."""
    o = config.task.optimizer
    return schedule_lib.WarmupCosineDecay(
        o.learning_rate, o.warmup_steps, config.trainer.train_steps,
        alpha=o.end_learning_rate_ratio)


def _learning_rate(config, step):
    """The rate of the update after `step` updates (what AdamW reads)."""
    return float(make_schedule(config)(step))


class Run:
    """A configured run: its task, and builders for the model and optimizer.

    Args:
        config: the validated `config.Config`.
        strategy: the run's strategy; None when built for the exports only.
        task: the task (`task.build(config)` when None).
    """

    def __init__(self, config, strategy=None, task=None):
        self.config = config
        self.strategy = strategy
        # Agreement between the workers of a multi-worker job.
        self.any_worker = (runtime_lib.any_worker_function(strategy)
                           if strategy is not None else tuple)
        self.task = task if task is not None else task_lib.build(config)

    def make_model(self):
        return self.task.build_model()

    def variables(self, model):
        """The variables the optimizer trains: `model.trainable_variables`.

        Raises:
            ValueError: there are none.
        """
        variables = list(model.trainable_variables)
        if not variables:
            raise ValueError(
                f"task {self.config.task.name!r}: build_model() returned a "
                f"{type(model).__name__} without trainable variables.")
        return variables

    def make_schedule(self):
        return make_schedule(self.config)

    def make_optimizer(self):
        """The config's `tf_adamw.AdamW`, with the trainer's schedule."""
        o = self.config.task.optimizer
        arguments = o.adamw_arguments()
        arguments["learning_rate"] = self.make_schedule()
        optimizer = tf_adamw.AdamW(**arguments)
        if o.exclude_from_weight_decay:
            optimizer.exclude_from_weight_decay(
                var_names=list(o.exclude_from_weight_decay))
        return optimizer


def _input_options(strategy):
    """`experimental_distribute_dataset` options for `strategy`.

    Replicas on CPUs (mirrored over logical CPUs, multi-worker on CPU hosts)
    get no per-replica prefetch buffer: their batches are in host memory
    already, and with the buffer TF 2.21 built per-device pipelines whose
    tf.data autotuning thread made deleting the iterator at the end of a run
    block for 7-170 s (it sleeps out its period instead of waking on
    cancellation). Accelerators (TPU) keep TF's defaults.
    """
    if strategy is tf.distribute.get_strategy() and (
            not tf.distribute.has_strategy()):
        return None  # the default strategy: a plain iterator
    devices = list(strategy.extended.worker_devices)
    if all("CPU" in d.upper().rsplit("/", 1)[-1] for d in devices):
        return tf.distribute.InputOptions(
            experimental_per_replica_buffer_size=0)
    return None


def _mean_factor(losses, global_batch_size):
    """1 / (global batch x loss elements per example): turns a replica's sum
    of the task's losses into its share of the global mean.

    Raises:
        ValueError: the losses are not `[batch, ...]` with static trailing
            dimensions.
    """
    if losses.shape.rank in (None, 0) or not (
            losses.shape[1:].is_fully_defined()):
        raise ValueError(
            "task.loss(targets, outputs) must return per-example losses of "
            "shape [batch] or [batch, ...] with static trailing dimensions; "
            f"got shape {losses.shape}.")
    return 1.0 / float(global_batch_size * losses.shape[1:].num_elements())


def make_train_loop(strategy, model, optimizer, task, global_batch_size):
    """A tf.function running `num_micro_steps` micro-steps from `iterator`.

    Returns (sum of the global mean losses, sum of the gradient norms) over
    the micro-steps. Written without AutoGraph (an explicit `tf.while_loop`)
    so that tracing does not convert the optimizer's Python code.
    """
    variables = list(model.trainable_variables)

    def replica_step(inputs, targets):
        # The optimizer's loss scale (1 without one), read before the step
        # that may change it: float16 gradients need the loss scaled up.
        scale = tf.convert_to_tensor(optimizer.scale_loss(1.0), tf.float32)
        with tf.GradientTape() as tape:
            losses = tf.cast(task.loss(targets, model(inputs, training=True)),
                             tf.float32)
            loss = tf.reduce_sum(losses) * _mean_factor(losses,
                                                        global_batch_size)
            scaled_loss = loss * scale
        grads = tape.gradient(scaled_loss, variables)
        # One all-reduce of the gradients; the norm of the sum is what the
        # optimizer clips, and is identical on every replica.
        grads = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, grads)
        grad_norm = tf.linalg.global_norm(grads) / scale
        optimizer.apply_gradients(zip(grads, variables),
                                  skip_gradients_aggregation=True)
        return loss, grad_norm

    @tf.function(autograph=False)
    def train_loop(iterator, num_micro_steps):
        def body(i, loss_total, norm_total):
            inputs, targets = iterator.get_next()
            loss, grad_norm = strategy.run(replica_step,
                                           args=(inputs, targets))
            loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss,
                                   axis=None)
            grad_norm = strategy.reduce(tf.distribute.ReduceOp.MEAN,
                                        grad_norm, axis=None)
            return i + 1, loss_total + loss, norm_total + grad_norm

        _, loss_total, norm_total = tf.while_loop(
            lambda i, *_: i < num_micro_steps, body,
            (tf.constant(0), tf.constant(0.0), tf.constant(0.0)))
        return loss_total, norm_total

    return train_loop


@dataclasses.dataclass(frozen=True)
class _Worker:
    """This process's place in a (possibly multi-worker) job.

    The chief writes the run's config, metrics, TensorBoard events,
    checkpoints and exports; the others only what saving distributed
    variables needs (see `_Checkpoints`). Every worker prints, the others
    with a `[worker N]` prefix.
    """
    chief: bool
    task_id: int

    def say(self, message):
        _say(message if self.chief else f"[worker {self.task_id}] {message}")


def _create_strategy(config, cpu_devices):
    """The strategy (devices are set up already); checks the batch splits.

    Raises:
        config_lib.ConfigError: the global batch size is not a multiple of
            the number of replicas.
    """
    strategy = runtime_lib.create_strategy(config.runtime, cpu_devices)
    replicas = strategy.num_replicas_in_sync
    batch = config.task.data.global_batch_size
    if batch % replicas:
        raise config_lib.ConfigError(
            f"key `task.data.global_batch_size` ({batch}) must be divisible "
            f"by the number of replicas ({replicas}, "
            f"{runtime_lib.strategy_name(strategy)}).")
    return strategy


def _banner(run, model):
    """The run's first console line: strategy, dtype, model and batch."""
    config, strategy = run.config, run.strategy
    n_params = sum(v.shape.num_elements() for v in run.variables(model))
    k = config.task.optimizer.gradient_accumulation_steps
    name = runtime_lib.strategy_name(strategy)
    replicas = strategy.num_replicas_in_sync
    where = (name if name.startswith("one device") else
             f"{name} with {replicas} replica{'s' if replicas > 1 else ''}")
    describe = task_lib.optional(run.task, "describe_example")
    example = describe() if describe else None
    # Millions, as always for the char LM; a small model's exact count.
    size = f"{n_params / 1e6:.2f}M" if n_params >= 10_000 else str(n_params)
    return (f"tf_adamw.train: {where}, "
            f"{config.runtime.mixed_precision_dtype}, model "
            f"{size} parameters, global batch "
            f"{config.task.data.global_batch_size}"
            + (f" x {example}" if example else "")
            + (f" x {k} accumulated" if k > 1 else "")
            + f", model_dir {config.trainer.model_dir}")


def _history_path(trainer):
    """The chief's metrics.jsonl: one JSON row per logged step."""
    return os.path.join(trainer.model_dir, "metrics.jsonl")


class _Checkpoints:
    """The run's checkpoints, numbered by step.

    Everyone restores from the chief's directory; the chief writes there,
    other workers to a scratch directory (every worker must take part in
    saving distributed variables).
    """

    def __init__(self, model, optimizer, trainer, worker):
        self._optimizer = optimizer
        self._checkpoint = tf.train.Checkpoint(model=model,
                                               optimizer=optimizer)
        self._directory = os.path.join(trainer.model_dir, "checkpoints")
        self._write_dir = self._directory if worker.chief else os.path.join(
            trainer.model_dir, f".worker_{worker.task_id}_checkpoints")
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, self._write_dir,
            max_to_keep=trainer.max_to_keep)
        self._last_saved = None

    def restore(self):
        """Restores the newest good checkpoint of the chief, if there is one.

        Returns:
            (the restored checkpoint's path or None, the step to start from).
        """
        with warnings.catch_warnings():
            # Hyperparameters that differ from the checkpoint's are said
            # below, as the trainer's own lines.
            warnings.filterwarnings("ignore", message="The checkpoint holds")
            restored = tf_adamw.restore_latest_good(self._checkpoint,
                                                    self._directory)
        start_step = int(self._optimizer.iterations.numpy())
        if restored:
            self._last_saved = start_step
        return restored, start_step

    def changed_hyperparameters(self):
        """Lines naming each hyperparameter whose configured value differs
        from the restored checkpoint's (the config wins)."""
        config = self._optimizer.get_config()
        return [f"Config sets {name}={config[name]!r} (the checkpoint had "
                f"{hyperparameters.as_float32_text(saved)})."
                for name, saved in
                self._optimizer.restored_hyperparameters.items()
                if hyperparameters.differs(saved, config[name])]

    def save(self, step):
        self._manager.save(checkpoint_number=step)
        self._last_saved = step

    def save_if_unsaved(self, step):
        """Saves `step` unless it was saved (or restored) already."""
        if self._last_saved != step:
            self.save(step)

    def path(self, step):
        """The chief's checkpoint of `step` (what the exports read)."""
        return os.path.join(self._directory, f"ckpt-{step}")

    def remove_scratch(self):
        """Deletes a non-chief worker's scratch checkpoints."""
        shutil.rmtree(self._write_dir, ignore_errors=True)


def _train_iterator(run, strategy, start_step):
    """The distributed training batches, from `start_step` on."""
    task = run.config.task
    dataset = run.task.train_dataset(
        task.data.global_batch_size,
        start_step * task.optimizer.gradient_accumulation_steps)
    return iter(strategy.experimental_distribute_dataset(
        dataset, _input_options(strategy)))


class _MetricsLog:
    """The logging window: loss and gradient-norm totals since the last row.

    `write` turns the window into one row (means per micro-step, the
    learning rate of its last step, steps/s) on the console, in TensorBoard
    and, on the chief, in metrics.jsonl, then opens the next window.
    `evaluate` logs an eval row the same ways (its own metrics.jsonl line
    for the step).
    """

    def __init__(self, run, worker):
        trainer = run.config.trainer
        self._train_steps = trainer.train_steps
        self._schedule = run.make_schedule()
        self.writer = (
            tf.summary.create_file_writer(
                os.path.join(trainer.model_dir, "train"))
            if worker.chief else tf.summary.create_noop_writer())
        self._history_path = _history_path(trainer) if worker.chief else None
        self._say = worker.say
        self.history = []  # the rows logged by this call (Result.history)
        self.evals = []  # the eval rows of this call (Result.evals)
        self._rates = []  # steps/s of every window so far
        self._open()

    def _open(self):
        self._loss = self._norm = 0.0
        self._micro_steps = self._steps = 0
        self._started = time.time()

    @property
    def empty(self):
        """True when no step was added since the last row."""
        return self._steps == 0

    def add(self, loss_total, norm_total, steps, micro_steps):
        """Adds one loop call's sums over its `micro_steps` micro-steps."""
        self._loss += float(loss_total)
        self._norm += float(norm_total)
        self._micro_steps += micro_steps
        self._steps += steps

    def _close(self, step):
        """The window's row, and the ETA in seconds."""
        elapsed = time.time() - self._started
        rate = self._steps / max(elapsed, 1e-9)
        self._rates.append(rate)
        recent = self._rates[-3:] if len(self._rates) > 1 else self._rates
        eta = (self._train_steps - step) / (sum(recent) / len(recent))
        row = {"step": step,
               "loss": self._loss / self._micro_steps,
               "learning_rate": float(self._schedule(step - 1)),
               "grad_norm": self._norm / self._micro_steps,
               "steps_per_sec": rate}
        return row, eta

    def write(self, step):
        """Logs the window that ends at `step`; opens the next one."""
        row, eta = self._close(step)
        self.history.append(row)
        total = self._train_steps
        self._say(f"step {step:>{len(str(total))}}/{total} | loss "
                  f"{row['loss']:.4f} | lr {row['learning_rate']:.3e} | "
                  f"grad_norm {row['grad_norm']:.3f} | "
                  f"{row['steps_per_sec']:.2f} steps/s | ETA "
                  f"{_duration(eta)}")
        for name in ("loss", "learning_rate", "grad_norm", "steps_per_sec"):
            _scalar_summary(name, row[name], step)
        self.writer.flush()
        if self._history_path:
            artifacts.append_history(self._history_path, row)
        self._open()

    def evaluate(self, step, evaluator):
        """Runs `evaluator` and logs its row for `step`."""
        started = time.time()
        losses = evaluator()
        seconds = time.time() - started
        # Evaluating is not training: keep it out of the window's steps/s.
        self._started += seconds
        row = {"step": step, **losses}
        self.evals.append(row)
        total = self._train_steps
        line = (f"eval step {step:>{len(str(total))}}/{total} | loss "
                f"{losses[evaluation.LOSS]:.4f}")
        if evaluation.LOSS_EMA in losses:
            line += f" | loss_ema {losses[evaluation.LOSS_EMA]:.4f}"
        self._say(f"{line} | {seconds:.1f} s")
        for name, value in losses.items():
            _scalar_summary(name, value, step)
        self.writer.flush()
        if self._history_path:
            artifacts.append_history(self._history_path, row)


@dataclasses.dataclass
class _LoopParts:
    """What the loop calls work with; `_run_loop` makes and releases them."""
    optimizer: typing.Any
    train_loop: typing.Any
    iterator: typing.Any
    evaluator: typing.Any
    metrics: _MetricsLog
    checkpoints: _Checkpoints


def _eval_due(trainer, step, done):
    every = trainer.eval_every_n_steps
    return done or bool(every and step % every == 0)


def _loop_calls(run, parts, start_step, hooks, stop):
    """Calls the train loop until `trainer.train_steps` or a stop request;
    evaluates when due.

    Returns:
        (the final step, the agreed stop code: `signals.NONE`, `SIGTERM` or
        `SIGINT`).
    """
    tr = run.config.trainer
    k = run.config.task.optimizer.gradient_accumulation_steps
    step = start_step
    while step < tr.train_steps:
        n = min(tr.steps_per_loop - step % tr.steps_per_loop,
                tr.train_steps - step)
        loss_total, norm_total = parts.train_loop(parts.iterator,
                                                  tf.constant(n * k))
        parts.metrics.add(loss_total, norm_total, n, n * k)
        step = int(parts.optimizer.iterations.numpy())
        done = step >= tr.train_steps
        if step % tr.log_every_n_steps == 0 or done:
            parts.metrics.write(step)
        if step % tr.checkpoint_every_n_steps == 0 or done:
            parts.checkpoints.save(step)
        for hook in hooks:
            hook(step)
        # Between two calls, never inside one. Every worker takes part, so
        # all of them stop (and save) at the same step.
        term, interrupt = run.any_worker((stop.code == signals.SIGTERM,
                                          stop.code == signals.SIGINT))
        if term or interrupt:
            if not parts.metrics.empty:
                parts.metrics.write(step)  # the steps since the last row
            # SIGINT anywhere: every worker exits as Ctrl-C'd.
            return step, signals.SIGINT if interrupt else signals.SIGTERM
        # After the stop check: a stopping run saves at once. Every worker
        # evaluates (its reductions are collectives) at the same steps.
        if _eval_due(tr, step, done):
            parts.metrics.evaluate(step, parts.evaluator)
    return step, signals.NONE


def _run_loop(run, model, optimizer, checkpoints, start_step, worker, hooks):
    """Trains from `start_step` to `trainer.train_steps`, or until SIGTERM or
    SIGINT asks to stop (see `signals`).

    Owns the input pipelines and the loop function: they are made here and
    released here, also when a step or a hook raises (no frame of a
    traceback keeps them).

    Returns:
        (the final step, the `_MetricsLog` (rows logged by this call), the
        name of the signal that stopped the run or None). The final step is
        saved in either case.
    """
    strategy = run.strategy
    options = _input_options(strategy)
    parts = _LoopParts(
        optimizer=optimizer,
        train_loop=make_train_loop(strategy, model, optimizer, run.task,
                                   run.config.task.data.global_batch_size),
        iterator=_train_iterator(run, strategy, start_step),
        evaluator=evaluation.Evaluator(
            strategy, model, optimizer, run.task,
            run.config.task.data.global_batch_size, options),
        metrics=_MetricsLog(run, worker), checkpoints=checkpoints)
    metrics = parts.metrics
    try:
        with metrics.writer.as_default(), signals.StopRequest() as stop:
            step, code = _loop_calls(run, parts, start_step, hooks, stop)
        checkpoints.save_if_unsaved(step)
    finally:
        # Release the input pipelines, the function that holds one first.
        parts.train_loop = parts.iterator = parts.evaluator = None
        del parts
        gc.collect()
    return step, metrics, signals.NAMES.get(code)


def _final_artifacts(run, checkpoint_path, say, losses=None):
    """The chief's loss curve and SavedModels.

    Args:
        run: the `Run`.
        checkpoint_path: the final checkpoint.
        say: prints a line.
        losses: the final eval results of that checkpoint, if the run has
            them (else the export evaluates it).

    Returns:
        `Result.exports`: the loss curve's path and what `artifacts.export`
        returns, for those the trainer config asks for.
    """
    tr = run.config.trainer
    exports = {}
    full_history = artifacts.read_history(_history_path(tr))
    if tr.loss_curve and full_history:
        png = os.path.join(tr.model_dir, "loss_curve.png")
        artifacts.plot_loss_curve(
            full_history, png,
            f"tf_adamw.train: {os.path.basename(tr.model_dir.rstrip('/'))}")
        exports["loss_curve"] = png
    if tr.export_saved_models:
        exports.update(artifacts.export(
            run, checkpoint_path, os.path.join(tr.model_dir, "export"),
            losses))
        say(evaluation.describe_choice(exports["weights"], tr.export_weights,
                                       exports["losses"]))
        if exports["summary"]:
            say(exports["summary"])
        say(f"SavedModels: {exports['serving_dir']} (serving), "
            f"{exports['training_dir']} (training); which weights: "
            f"{exports['weights_file']}.")
    return exports


def _final_losses(trainer, use_ema):
    """The eval results of step `train_steps` in metrics.jsonl, or None."""
    for row in artifacts.read_history(_history_path(trainer)):
        if row["step"] == trainer.train_steps and evaluation.LOSS in row:
            keys = (evaluation.LOSS,) + (
                (evaluation.LOSS_EMA,) if use_ema else ())
            if all(key in row for key in keys):
                return {key: row[key] for key in keys}
    return None


def _latest_checkpoint(directory):
    """(path, step) of the newest checkpoint in `directory`, or (None, None).

    The step is the number in the name (`ckpt-<step>`), which the trainer
    writes as the optimizer's step.
    """
    state = tf.train.get_checkpoint_state(directory)
    path = state.model_checkpoint_path if state else ""
    number = path.rsplit("-", 1)[-1]
    if not number.isdigit():
        return None, None
    return path, int(number)


def _holds_step(path, step):
    """True if the checkpoint at `path` reads back and is at `step`."""
    try:
        reader = tf.train.load_checkpoint(path)
        saved = reader.get_tensor(
            "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")
    except (tf.errors.OpError, OSError, ValueError, IndexError,
            RuntimeError):
        return False  # damaged: the normal path falls back to an older one
    return int(saved) == step


def _exports_missing(tr):
    if not tr.export_saved_models:
        return False
    export = os.path.join(tr.model_dir, "export")
    # The weights file is written after both SavedModels.
    return not all(tf.io.gfile.exists(os.path.join(export, path)) for path in
                   ("serving/saved_model.pb", "training/saved_model.pb",
                    artifacts.WEIGHTS_FILE))


def _already_complete(config, task, worker, checkpoint, started):
    """The run in `model_dir` is finished: says so, trains nothing.

    Writes the exports only if a previous run stopped between its final
    checkpoint and its exports (e.g. killed while exporting), with the
    final eval results it logged if any.
    """
    tr = config.trainer
    exports = {}
    if worker.chief and _exports_missing(tr):
        worker.say(f"Training is complete (step {tr.train_steps}/"
                   f"{tr.train_steps}, {checkpoint}); writing the missing "
                   "exports.")
        exports = _final_artifacts(
            Run(config, task=task), checkpoint, worker.say,
            _final_losses(tr, config.task.optimizer.use_ema))
    else:
        worker.say(f"Run already complete: step {tr.train_steps}/"
                   f"{tr.train_steps} ({checkpoint}); nothing to do. Raise "
                   "--train_steps to train further.")
    return Result(start_step=tr.train_steps, final_step=tr.train_steps,
                  history=[], model_dir=tr.model_dir, checkpoint=checkpoint,
                  exports=exports, wall_seconds=time.time() - started,
                  already_complete=True)


def _start(config, task, cpu_devices, worker, saved):
    """Strategy, config.yaml, model and optimizer, restored; says so.

    Returns:
        (run, model, optimizer, checkpoints, start step).
    """
    tr = config.trainer
    strategy = _create_strategy(config, cpu_devices)
    if worker.chief:
        rundir.write_config(tr.model_dir, config)
    run = Run(config, strategy, task)
    with strategy.scope():
        model = run.make_model()
        optimizer = run.make_optimizer()
        optimizer.build(run.variables(model))
    worker.say(_banner(run, model))

    checkpoints = _Checkpoints(model, optimizer, tr, worker)
    restored, start_step = checkpoints.restore()
    if restored:
        worker.say(f"Resumed from {restored} at step {start_step}.")
        for line in checkpoints.changed_hyperparameters():
            worker.say(line)
        line = rundir.schedule_change(saved, config, start_step,
                                      _learning_rate)
        if line:
            worker.say(line)
    if worker.chief:
        artifacts.truncate_history(_history_path(tr), start_step)
    return run, model, optimizer, checkpoints, start_step


def _train_in(config, task, cpu_devices, worker, hooks, started):
    """`train` once the model directory is locked."""
    tr = config.trainer
    checkpoint, checkpoint_step = _latest_checkpoint(
        os.path.join(tr.model_dir, "checkpoints"))
    # Before anything is written: a refused resume leaves config.yaml as
    # it was.
    saved = rundir.check_resume(tr.model_dir, config, checkpoint_step)
    if checkpoint_step == tr.train_steps and _holds_step(checkpoint,
                                                         checkpoint_step):
        return _already_complete(config, task, worker, checkpoint, started)

    run, model, optimizer, checkpoints, start_step = _start(
        config, task, cpu_devices, worker, saved)
    step, metrics, stopped_by = _run_loop(run, model, optimizer, checkpoints,
                                          start_step, worker, hooks)
    final_checkpoint = checkpoints.path(step)
    exports = {}
    if stopped_by:
        worker.say(f"Stopped by {stopped_by} at step {step}/{tr.train_steps}"
                   f": saved checkpoint {final_checkpoint}. Run the same "
                   "command again to resume.")
    elif worker.chief:
        last = metrics.evals[-1] if metrics.evals else {}
        losses = ({k: v for k, v in last.items() if k != "step"}
                  if last.get("step") == step else None)
        exports = _final_artifacts(run, final_checkpoint, worker.say, losses)
    if not worker.chief:
        checkpoints.remove_scratch()
    # Workers leave together (see wait_for_all_workers).
    runtime_lib.wait_for_all_workers(run.any_worker)
    wall = time.time() - started
    if not stopped_by:
        worker.say(f"Done: step {step}/{tr.train_steps} in "
                   f"{_duration(wall)} ({wall:.1f} s).")
    return Result(start_step=start_step, final_step=step,
                  history=metrics.history, model_dir=tr.model_dir,
                  checkpoint=final_checkpoint, exports=exports,
                  wall_seconds=wall, stopped_by=stopped_by,
                  evals=metrics.evals)


def train(config, hooks=()):
    """Runs (or resumes) the training job described by `config`.

    Holds the model directory's lock throughout (see `rundir`). SIGTERM and
    SIGINT during the loop save a checkpoint of the current step and stop
    (`Result.stopped_by`); a finished run returns at once
    (`Result.already_complete`).

    Args:
        config: a validated `config.Config`.
        hooks: callables `hook(step)` run after each loop call (after
            logging and checkpointing); an exception stops the run there,
            e.g. to simulate a crash in tests.

    Returns:
        A `Result`.

    Raises:
        config_lib.ConfigError: `task.name` does not resolve to a task, or
            the task refuses `task.params`.
        rundir.RunDirError: another trainer holds the model directory, or
            the run there has another model/data config.
    """
    started = time.time()
    # The task first: a bad task.name or task.params is an error before
    # anything is written (building a task makes no tensor, so the devices
    # can still be set up after it).
    task = task_lib.build(config)
    model_dir = config.trainer.model_dir
    # Logical CPUs and TF_CONFIG first, before TensorFlow starts.
    cpu_devices = runtime_lib.setup_devices(config.runtime)
    chief, task_id = runtime_lib.worker_identity(config.runtime)
    worker = _Worker(chief=chief, task_id=task_id)
    tf.io.gfile.makedirs(model_dir)
    with rundir.Lock(rundir.lock_path(model_dir, chief, task_id)) as lock:
        if lock.took_over_from:
            worker.say(f"Took over {lock.path} from pid {lock.took_over_from}"
                       ", a trainer that ended without releasing it.")
        return _train_in(config, task, cpu_devices, worker, hooks, started)
