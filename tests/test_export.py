"""tf_adamw.export: training and serving SavedModels, EMA weights, resume.

1. A training SavedModel (`export_training_model`, and plain
   `tf.saved_model.save` on a module holding the optimizer) loads in a new
   process with plain `tf.saved_model.load` and continues bit-identically,
   with the optimizer's step compiled by XLA and not.
2. A serving SavedModel holds the EMA averages (when used) and no optimizer
   state; the live variables are untouched, bit for bit.
3. `ema_weights` swaps and restores exactly, on one device and on every
   replica copy under MirroredStrategy (and the TPU-like no-merge-call
   path), also when the block raises.
4. `restore_training_variables`: exported on one device, resumed under
   MirroredStrategy over 4 logical CPUs, equal to the uninterrupted run. And
   the caveat it exists for: a SavedModel loaded under a strategy silently
   diverges.
Every misuse raises an error that names what is wrong.
"""

import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import export_worker
import tf_adamw

HERE = os.path.dirname(os.path.abspath(__file__))
N_STEPS = 5  # before the export: 2 applied updates + 1 pending micro-step
M_STEPS = 7  # after it: overwrites at applied updates 3 and 6
SIGNATURE = [tf.TensorSpec([None, 4], tf.float32),
             tf.TensorSpec([None, 3], tf.float32)]


def make_optimizer(jit_compile=True, fused=None):
    schedule = keras.optimizers.schedules.ExponentialDecay(
        initial_learning_rate=0.05, decay_steps=2, decay_rate=0.7)
    return tf_adamw.AdamW(
        learning_rate=schedule, weight_decay=0.004, amsgrad=True,
        use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3,
        gradient_accumulation_steps=2, global_clipnorm=1.0,
        jit_compile=jit_compile, fused=fused)


def make_model():
    """A small Keras 3 model with seeded initializers (same in any process
    and under any strategy)."""
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(
            8, activation="tanh",
            kernel_initializer=keras.initializers.GlorotUniform(seed=1),
            bias_initializer=keras.initializers.RandomNormal(seed=2)),
        keras.layers.Dense(
            3, kernel_initializer=keras.initializers.GlorotUniform(seed=3)),
    ])


class Trainer(tf.Module):
    """What the trainer exports: the model, the optimizer, `train_step`."""

    def __init__(self, jit_compile=True, build=True, fused=None):
        super().__init__(name="trainer")
        self.model = make_model()
        self.optimizer = make_optimizer(jit_compile, fused)
        if build:
            self.optimizer.build(self.model.trainable_variables)

    def replica_step(self, x, y):
        """Forward, backward, apply; the loss is scaled by the global batch
        so that N replicas summing their gradients equal one device."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(
                tf.square(self.model(x) - y)) / export_worker.GLOBAL_BATCH
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return loss

    @tf.function(input_signature=SIGNATURE)
    def train_step(self, x, y):
        return self.replica_step(x, y)


def run_steps(step_fn, first, count):
    for s in range(first, first + count):
        step_fn(*export_worker.batch(s))


def state(root):
    """Every variable reachable from `root`, by checkpoint key.

    A live Keras model is reached first through `_functional/_operations`,
    the same model loaded from a SavedModel through `_layers` (same indices):
    keys are written the SavedModel way so that the two compare.
    """
    return {k.replace("model/_functional/_operations/", "model/_layers/"): v
            for k, v in _checkpoint_values(tf.train.Checkpoint(root)).items()}


def _checkpoint_values(checkpoint):
    with tempfile.TemporaryDirectory() as tmp:
        prefix = checkpoint.write(os.path.join(tmp, "state"))
        reader = tf.train.load_checkpoint(prefix)
        return {k: reader.get_tensor(k) for k in
                reader.get_variable_to_shape_map()
                if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def assert_states_equal(got, want, what):
    assert sorted(got) == sorted(want), what
    different = [k for k in want if got[k].dtype != want[k].dtype
                 or not np.array_equal(got[k], want[k])]
    assert not different, f"{what}: not bit-identical: {different}"


def optimizer_keys(keys):
    return [k for k in keys if k.startswith("optimizer/")]


# ----------------------------------------------------------------------------
# 1. Training SavedModel.

# Both ways of saving; the optimizer on its default (fused) step, and on its
# XLA step (`fused=False`, the step TPUs and GPUs run).
EXPORT_VARIANTS = [("export_training_model", True, None),
                   ("tf.saved_model.save", False, None),
                   ("export_training_model", True, False)]


def variant_name(how, jit, fused):
    return f"{how}-jit{int(jit)}" + ("-xla" if fused is False else "")


@pytest.fixture(scope="module")
def training_exports(tmp_path_factory):
    """Per variant: export after N steps, then the uninterrupted N+M run."""
    tmp = tmp_path_factory.mktemp("training_exports")
    out = {}
    for how, jit, fused in EXPORT_VARIANTS:
        name = variant_name(how, jit, fused)
        trainer = Trainer(jit_compile=jit, fused=fused)
        assert trainer.optimizer.uses_fused_kernel == (fused is None), name
        run_steps(trainer.train_step, 0, N_STEPS)
        export_dir = str(tmp / name)
        if how == "export_training_model":
            tf_adamw.export_training_model(export_dir, trainer)
        else:
            tf.saved_model.save(trainer, export_dir)
        saved = state(trainer)
        run_steps(trainer.train_step, N_STEPS, M_STEPS)
        out[name] = {"dir": export_dir, "saved": saved,
                     "final": state(trainer)}
    out["tmp"] = tmp
    return out


def test_saved_training_state_is_nontrivial(training_exports):
    """Guards the resume tests: a pending micro-step, moved slots."""
    saved = training_exports["export_training_model-jit1"]["saved"]
    assert saved["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"] == 2
    assert saved[
        "optimizer/_accumulation_count/.ATTRIBUTES/VARIABLE_VALUE"] == 1
    for kind in ("momentums", "velocities", "velocity_hats", "averages",
                 "accumulators"):
        slot = saved[f"optimizer/_{kind}/0/.ATTRIBUTES/VARIABLE_VALUE"]
        assert np.any(slot != 0), kind


@pytest.mark.multiprocess
def test_training_export_resumes_bit_identically_in_a_new_process(
        training_exports):
    """One new process resumes every variant: `tf.saved_model.load`, then
    `loaded.train_step` for M steps; every model and optimizer variable
    equals the run that never stopped, bit for bit."""
    tmp = training_exports["tmp"]
    names = [variant_name(*v) for v in EXPORT_VARIANTS]
    spec = {"runs": [{"export_dir": training_exports[n]["dir"],
                      "first": N_STEPS, "count": M_STEPS,
                      "out": str(tmp / f"resumed-{n}")} for n in names]}
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)  # plain TensorFlow: no tf_adamw on the path
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "export_worker.py"),
         str(spec_path)],
        cwd=str(tmp), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "imports ok" in proc.stdout, proc.stdout
    for run, name in zip(spec["runs"], names):
        reader = tf.train.load_checkpoint(run["out"])
        got = {k: reader.get_tensor(k) for k in
               reader.get_variable_to_shape_map()
               if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}
        want = training_exports[name]["final"]
        assert len(optimizer_keys(want)) == 4 * 5 + 2 + 4, sorted(want)
        assert_states_equal(got, want, name)


def test_training_export_resumes_in_process_and_holds_exactly_the_state(
        training_exports):
    """Loading in this process continues identically too; the export's
    variables are exactly the model's and the optimizer's (no EMA copy, no
    compiled-step state), and it has no serving signature."""
    entry = training_exports["export_training_model-jit1"]
    loaded = tf.saved_model.load(entry["dir"])
    assert_states_equal(state(loaded), entry["saved"], "right after loading")
    assert not loaded.signatures, "a train step must not be a serving signature"
    run_steps(loaded.train_step, N_STEPS, M_STEPS)
    assert_states_equal(state(loaded), entry["final"], "after M steps")
    keys = sorted(k for k, _ in tf.train.list_variables(
        os.path.join(entry["dir"], "variables", "variables")))
    assert keys == sorted(["_CHECKPOINTABLE_OBJECT_GRAPH"] + list(
        entry["saved"]))


def test_compiled_step_holder_is_not_in_the_saved_object_graph(
        training_exports):
    """The optimizer's step functions (`tf_adamw.step_kinds.StepRunner`) are
    invisible to SavedModel: no node for them, no extra function to save.
    The XLA step is a function of its own with its XLA attribute; for an
    optimizer on the fused kernel, `train_step` holds the plain-op twin of
    its step and no custom op (a SavedModel must load where tf_adamw's
    kernel library is absent)."""
    for name in ("export_training_model-jit1", "tf.saved_model.save-jit0",
                 "export_training_model-jit1-xla"):
        path = os.path.join(training_exports[name]["dir"], "saved_model.pb")
        proto = saved_model_pb2.SavedModel()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        graph = proto.meta_graphs[0].object_graph_def
        child_names = {c.local_name for node in graph.nodes
                       for c in node.children}
        assert not child_names & {"_engine", "runner", "functions",
                                  "adamw_step"}
        library = proto.meta_graphs[0].graph_def.library
        step_functions = [f for f in library.function
                          if "adamw_step" in f.signature.name]
        if name.endswith("-xla"):
            # Its own function, compiled by XLA when called.
            assert step_functions, [f.signature.name for f in library.function]
            assert all(f.attr["_XlaMustCompile"].b for f in step_functions)
        else:
            # Traced straight into `train_step`'s graph.
            assert not step_functions, name
        ops = {node.op for f in library.function for node in f.node_def}
        assert "TfAdamwFusedApply" not in ops, name
        assert "ResourceApplyAdam" not in ops  # the pipeline's own ops


def test_export_before_the_first_step_traces_the_step_at_save_time(tmp_path):
    """Built but never called (no step function yet): saving traces the
    step; the loaded step equals a live one."""
    module = _Unbuilt()
    module.optimizer.build([module.v])
    assert not module.optimizer.tracing_count()
    tf_adamw.export_training_model(str(tmp_path / "fresh"), module)
    loaded = tf.saved_model.load(str(tmp_path / "fresh"))
    for g in ([0.5, -1.0], [2.0, 0.25]):
        module.train_step(tf.constant(g))
        loaded.train_step(tf.constant(g))
    assert_states_equal(state(loaded), state(module), "fresh export")
    assert int(loaded.optimizer._iterations.numpy()) == 2


class _NoStep(tf.Module):
    def __init__(self):
        super().__init__()
        self.v = tf.Variable([1.0, 2.0])
        self.optimizer = tf_adamw.AdamW()
        self.optimizer.build([self.v])


class _PythonStep(_NoStep):
    def train_step(self, x):
        return x


class _NoSignature(_NoStep):
    @tf.function
    def train_step(self, g):
        self.optimizer.apply_gradients([(g, self.v)])


class _Unbuilt(tf.Module):
    def __init__(self):
        super().__init__()
        self.v = tf.Variable([1.0, 2.0])
        self.optimizer = tf_adamw.AdamW()

    @tf.function(input_signature=[tf.TensorSpec([2])])
    def train_step(self, g):
        self.optimizer.apply_gradients([(g, self.v)])


class _NoOptimizer(tf.Module):
    def __init__(self):
        super().__init__()
        self.v = tf.Variable([1.0, 2.0])

    @tf.function(input_signature=[tf.TensorSpec([2])])
    def train_step(self, g):
        self.v.assign_sub(g)


class _UntrackedModel(_Unbuilt):
    def __init__(self):
        super().__init__()
        # Only the optimizer knows this variable: the module does not.
        hidden = tf.Variable([3.0], name="hidden")
        self.optimizer.build([self.v, hidden])


_UNTRACKED_LR = tf.Variable(0.01)  # read by a callable: no module tracks it


class _UntrackedHyperparameter(_Unbuilt):
    def __init__(self):
        super().__init__()
        self.optimizer = tf_adamw.AdamW(
            learning_rate=lambda: _UNTRACKED_LR * 2.0)
        self.optimizer.build([self.v])


@pytest.mark.parametrize("module_cls, match", [
    (_NoStep, "has no `train_step`"),
    (_PythonStep, "`module.train_step` must be a `tf.function`"),
    (_NoSignature, "`module.train_step` has no `input_signature`"),
    (_Unbuilt, r"optimizer `module.optimizer` is not built"),
    (_NoOptimizer, "holds no `tf_adamw.AdamW`"),
    (_UntrackedModel, "does not track.*'hidden:0'"),
    (_UntrackedHyperparameter, "captures a variable that `module` does not "
                               "track.*learning-rate callable"),
])
def test_export_training_model_rejects_misuse(module_cls, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        tf_adamw.export_training_model(str(tmp_path / "x"), module_cls())
    if module_cls is not _UntrackedHyperparameter:  # TF fails mid-save
        assert not (tmp_path / "x").exists()


def test_export_training_model_rejects_a_non_module(tmp_path):
    with pytest.raises(TypeError, match="`module` must be a `tf.Module`"):
        tf_adamw.export_training_model(str(tmp_path / "x"), object())


def test_export_training_model_rejects_a_distributed_optimizer(
        tmp_path, mirrored_strategy):
    """A step saved under MirroredStrategy cannot run after loading (its
    graph addresses every replica's device without the all-reduce): refuse
    it and point to the checkpoint path."""
    with mirrored_strategy.scope():
        trainer = Trainer()
    with pytest.raises(ValueError, match="built under MirroredStrategy.*"
                       "restore_training_variables"):
        tf_adamw.export_training_model(str(tmp_path / "x"), trainer)


# ----------------------------------------------------------------------------
# 2. Serving SavedModel and 3. ema_weights.


class Server(tf.Module):
    """What serving exports: the model and `serve`, no optimizer."""

    def __init__(self, model):
        super().__init__(name="server")
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def serve(self, x):
        return {"y": self.model(x)}


def _trained(steps):
    trainer = Trainer()
    run_steps(trainer.train_step, 0, steps)
    return trainer


def _shard(strategy, array):
    per = export_worker.GLOBAL_BATCH // strategy.num_replicas_in_sync

    def fn(ctx):
        r = ctx.replica_id_in_sync_group
        return array[r * per:(r + 1) * per]

    return strategy.experimental_distribute_values_from_function(fn)


def _copies(strategy, variable):
    inner = getattr(variable, "value", None)
    if isinstance(inner, tf.Variable):
        variable = inner  # a Keras variable's tf.Variable
    if strategy is None:
        return [variable]
    return list(strategy.experimental_local_results(variable))


def _values(strategy, variables):
    """Every copy's value, as numpy (copied)."""
    return [[np.array(c.numpy()) for c in _copies(strategy, v)]
            for v in variables]


def _assert_bitwise(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        for r, (gc, wc) in enumerate(zip(g, w)):
            assert gc.dtype == wc.dtype and np.array_equal(gc, wc), (
                f"{what}: variable {i}, copy {r}")


@pytest.fixture(scope="module")
def trained():
    """A single-device Trainer after 8 steps (4 applied updates, the last
    after an EMA overwrite, so the averages differ from the variables).
    Tests only swap and restore its values, and check that they did."""
    return _trained(steps=8)


def test_serving_export_holds_the_ema_weights_and_no_optimizer_state(
        tmp_path, trained):
    trainer = trained
    variables = trainer.model.variables
    before = _values(None, variables)
    averages = [trainer.optimizer.slots_for(v)["average"].numpy()
                for v in trainer.model.trainable_variables]
    assert not all(np.array_equal(a, b[0]) for a, b in zip(averages, before))

    export_dir = str(tmp_path / "serving")
    tf_adamw.export_serving_model(export_dir, Server(trainer.model),
                                  optimizer=trainer.optimizer)
    _assert_bitwise(_values(None, variables), before, "live variables")

    saved = dict(tf.train.list_variables(
        os.path.join(export_dir, "variables", "variables")))
    assert sorted(saved) == sorted([
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        "model/_layers/1/_kernel/.ATTRIBUTES/VARIABLE_VALUE",
        "model/_layers/1/bias/.ATTRIBUTES/VARIABLE_VALUE",
        "model/_layers/2/_kernel/.ATTRIBUTES/VARIABLE_VALUE",
        "model/_layers/2/bias/.ATTRIBUTES/VARIABLE_VALUE",
    ]), "only the model's variables: no optimizer state"
    reader = tf.train.load_checkpoint(
        os.path.join(export_dir, "variables", "variables"))
    keys = ["model/_layers/1/_kernel", "model/_layers/1/bias",
            "model/_layers/2/_kernel", "model/_layers/2/bias"]
    for key, average in zip(keys, averages):
        np.testing.assert_array_equal(
            reader.get_tensor(f"{key}/.ATTRIBUTES/VARIABLE_VALUE"), average,
            err_msg=key)

    loaded = tf.saved_model.load(export_dir)
    assert list(loaded.signatures) == ["serving_default"]
    x = tf.constant(export_worker.batch(99)[0])
    server = Server(trainer.model)
    with tf_adamw.ema_weights(trainer.optimizer):
        want = server.serve(x)["y"].numpy()
    np.testing.assert_allclose(
        loaded.signatures["serving_default"](x)["y"].numpy(), want,
        rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_serving_export_without_ema_holds_the_live_weights(tmp_path,
                                                           with_optimizer):
    model = make_model()
    optimizer = tf_adamw.AdamW(learning_rate=0.1)
    optimizer.apply_gradients(
        [(tf.ones_like(v), v) for v in model.trainable_variables])
    export_dir = str(tmp_path / "serving")
    tf_adamw.export_serving_model(
        export_dir, Server(model),
        optimizer=optimizer if with_optimizer else None)
    reader = tf.train.load_checkpoint(
        os.path.join(export_dir, "variables", "variables"))
    np.testing.assert_array_equal(
        reader.get_tensor("model/_layers/2/bias/.ATTRIBUTES/VARIABLE_VALUE"),
        model.layers[1].bias.numpy())


class _ServerWithOptimizer(Server):
    def __init__(self, model, optimizer):
        super().__init__(model)
        self.training = tf.Module()
        self.training.optimizer = optimizer


class _ServerWithSlot(Server):
    def __init__(self, model, optimizer):
        super().__init__(model)
        self.slot = optimizer.slots_for(model.trainable_variables[0])[
            "momentum"]


class _ServerWithoutSignature(tf.Module):
    def __init__(self, model, optimizer):
        del optimizer
        super().__init__()
        self.model = model

    @tf.function
    def serve(self, x):
        return self.model(x)


class _ServerWithoutServe(tf.Module):
    def __init__(self, model, optimizer):
        del optimizer
        super().__init__()
        self.model = model


@pytest.mark.parametrize("module_cls, match", [
    (_ServerWithOptimizer, "holds an optimizer at `module.training.optimizer`"),
    (_ServerWithSlot, "holds the optimizer variable .* at `module.slot`"),
    (_ServerWithoutSignature, "`module.serve` has no `input_signature`"),
    (_ServerWithoutServe, "has no `serve`"),
])
def test_export_serving_model_rejects_misuse(module_cls, match, tmp_path):
    trainer = Trainer()
    with pytest.raises(ValueError, match=match):
        tf_adamw.export_serving_model(
            str(tmp_path / "x"), module_cls(trainer.model, trainer.optimizer),
            optimizer=trainer.optimizer)
    assert not (tmp_path / "x").exists()


def test_export_serving_model_rejects_an_optimizer_of_other_variables(
        tmp_path, trained):
    trainer = trained
    with pytest.raises(ValueError, match="None of `module`'s variables"):
        tf_adamw.export_serving_model(str(tmp_path / "x"),
                                      Server(make_model()),
                                      optimizer=trainer.optimizer)
    with pytest.raises(TypeError, match="`optimizer` must be a"):
        tf_adamw.export_serving_model(str(tmp_path / "x"),
                                      Server(trainer.model),
                                      optimizer=keras.optimizers.AdamW())


def test_ema_weights_swaps_and_restores_exactly_on_one_device(trained):
    trainer = trained
    opt = trainer.optimizer
    variables = trainer.model.trainable_variables
    before = _values(None, variables)
    averages = [opt.slots_for(v)["average"].numpy() for v in variables]
    with tf_adamw.ema_weights(opt) as swapped:
        assert len(swapped) == len(variables)
        for v, average in zip(variables, averages):
            np.testing.assert_array_equal(v.numpy(), average)
    _assert_bitwise(_values(None, variables), before, "after the block")

    # A subset: only those are swapped.
    with tf_adamw.ema_weights(opt, var_list=variables[:1]):
        np.testing.assert_array_equal(variables[0].numpy(), averages[0])
        np.testing.assert_array_equal(variables[1].numpy(), before[1][0])
    _assert_bitwise(_values(None, variables), before, "after the subset")

    # An exception inside the block: restored, and the exception propagates.
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with tf_adamw.ema_weights(opt):
            raise RuntimeError("evaluation failed")
    _assert_bitwise(_values(None, variables), before, "after an exception")


def test_ema_weights_inside_a_tf_function(trained):
    trainer = trained
    opt, model = trainer.optimizer, trainer.model
    x = tf.constant(export_worker.batch(50)[0])
    before = _values(None, model.trainable_variables)

    @tf.function
    def predict(x):
        return model(x)

    @tf.function
    def evaluate(x):
        with tf_adamw.ema_weights(opt):
            return model(x)

    # Both traced (same graph optimisations), so the bits compare.
    with tf_adamw.ema_weights(opt):
        want = predict(x).numpy()
    assert not np.array_equal(predict(x).numpy(), want)
    np.testing.assert_array_equal(evaluate(x).numpy(), want)
    _assert_bitwise(_values(None, model.trainable_variables), before,
                    "after the traced block")


def test_ema_weights_16_bit_variables_restore_exactly():
    v = tf.Variable(tf.constant([1.0, 2.0, 3.0], tf.bfloat16))
    opt = tf_adamw.AdamW(learning_rate=0.1, use_ema=True, ema_momentum=0.5)
    for _ in range(3):
        opt.apply_gradients([(tf.constant([1.0, -1.0, 0.5], tf.bfloat16), v)])
    before = v.numpy().copy()
    average = opt.slots_for(v)["average"]
    assert average.dtype == tf.float32
    with tf_adamw.ema_weights(opt):
        np.testing.assert_array_equal(
            v.numpy(), tf.cast(average, tf.bfloat16).numpy())
    assert v.dtype == tf.bfloat16
    np.testing.assert_array_equal(v.numpy().view(np.uint16),
                                  before.view(np.uint16))


def _make_copies_distinct(strategy, opt, variables):
    """Gives every copy of every variable and average its own value (no
    training needed: the averages are plain variables)."""
    for i, v in enumerate(variables):
        for r, (copy, average) in enumerate(zip(
                _copies(strategy, v),
                _copies(strategy, opt.slots_for(v)["average"]))):
            copy.assign(copy + 0.001 * (r + 1) * (i + 1))
            average.assign(copy - 0.002 * (r + 2))


@pytest.mark.parametrize("strategy_name",
                         ["mirrored_strategy", "tpu_like_strategy"])
def test_ema_weights_swaps_every_replica_copy(strategy_name, request):
    """Each copy gets its own replica's average and gets back its own
    value: the copies are made deliberately different to tell them apart."""
    strategy = request.getfixturevalue(strategy_name)
    with strategy.scope():
        trainer = Trainer()
    opt = trainer.optimizer
    variables = trainer.model.trainable_variables
    _make_copies_distinct(strategy, opt, variables)
    before = _values(strategy, variables)
    averages = _values(strategy, [opt.slots_for(v)["average"]
                                  for v in variables])
    assert len(before[0]) == 4
    with tf_adamw.ema_weights(opt):
        _assert_bitwise(_values(strategy, variables), averages,
                        "inside the block")
    _assert_bitwise(_values(strategy, variables), before, "after the block")

    with pytest.raises(KeyError):
        with tf_adamw.ema_weights(opt):
            raise KeyError("boom")
    _assert_bitwise(_values(strategy, variables), before,
                    "after an exception")


def test_serving_export_under_mirrored_strategy(tmp_path, mirrored_strategy):
    with mirrored_strategy.scope():
        trainer = Trainer()
    variables = trainer.model.trainable_variables
    _make_copies_distinct(mirrored_strategy, trainer.optimizer, variables)
    before = _values(mirrored_strategy, variables)
    export_dir = str(tmp_path / "serving")
    tf_adamw.export_serving_model(export_dir, Server(trainer.model),
                                  optimizer=trainer.optimizer)
    _assert_bitwise(_values(mirrored_strategy, variables), before,
                    "live copies")
    reader = tf.train.load_checkpoint(
        os.path.join(export_dir, "variables", "variables"))
    # SavedModel writes the first replica's copy.
    np.testing.assert_array_equal(
        reader.get_tensor("model/_layers/1/_kernel/.ATTRIBUTES/VARIABLE_VALUE"),
        _copies(mirrored_strategy,
                trainer.optimizer.slots_for(variables[0])["average"])[0])


def test_ema_weights_rejects_misuse(mirrored_strategy):
    v = tf.Variable([1.0, 2.0])
    no_ema = tf_adamw.AdamW()
    no_ema.build([v])
    with pytest.raises(ValueError, match="use_ema=True"):
        with tf_adamw.ema_weights(no_ema):
            pass
    unbuilt = tf_adamw.AdamW(use_ema=True)
    with pytest.raises(ValueError, match="needs a built optimizer"):
        with tf_adamw.ema_weights(unbuilt):
            pass
    with pytest.raises(TypeError, match="must be a `tf_adamw.AdamW`"):
        with tf_adamw.ema_weights(keras.optimizers.AdamW(use_ema=True)):
            pass
    opt = tf_adamw.AdamW(use_ema=True)
    opt.apply_gradients([(tf.ones([2]), v)])
    before = v.numpy().copy()
    stranger = tf.Variable([5.0], name="stranger")
    with pytest.raises(ValueError, match="Unknown variable: 'stranger"):
        with tf_adamw.ema_weights(opt, var_list=[v, stranger]):
            pass
    np.testing.assert_array_equal(v.numpy(), before)

    with mirrored_strategy.scope():
        w = tf.Variable([1.0, 2.0])
        dist = tf_adamw.AdamW(use_ema=True)
        dist.build([w])

    def in_replica():
        with tf_adamw.ema_weights(dist):
            pass

    with pytest.raises(ValueError, match="outside `strategy.run`"):
        mirrored_strategy.run(in_replica)


# ----------------------------------------------------------------------------
# 4. Distributed resume, and the caveat.


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    """Exported after N steps on one device; the uninterrupted N+M run."""
    export_dir = str(tmp_path_factory.mktemp("distributed") / "export")
    trainer = Trainer()
    run_steps(trainer.train_step, 0, N_STEPS)
    tf_adamw.export_training_model(export_dir, trainer)
    saved = state(trainer)
    run_steps(trainer.train_step, N_STEPS, M_STEPS)
    return {"dir": export_dir, "saved": saved, "final": state(trainer)}


def _distributed_state(strategy, trainer):
    """Replica 0's values by checkpoint key, after checking that every
    replica holds the same copy."""
    for v in trainer.model.variables + trainer.optimizer.variables:
        copies = _copies(strategy, v)
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy.numpy(), copies[0].numpy(),
                                          err_msg=v.name)
    return state(trainer)


def _distributed_step(strategy, trainer):
    @tf.function
    def step(x, y):
        strategy.run(trainer.replica_step, args=(x, y))

    return step


def test_restore_training_variables_fills_every_copy_of_a_built_module(
        single_device_run, mirrored_strategy):
    with mirrored_strategy.scope():
        trainer = Trainer(build=True)
    status = tf_adamw.restore_training_variables(single_device_run["dir"],
                                                 trainer)
    status.assert_consumed()
    got = _distributed_state(mirrored_strategy, trainer)
    assert sorted(got) == sorted(single_device_run["saved"])
    assert_states_equal(got, single_device_run["saved"], "restored copies")


def test_restore_training_variables_resumes_under_mirrored_strategy(
        single_device_run, mirrored_strategy):
    """Restored before the optimizer is built (its slots get their values
    when built), then M steps on 4 replicas: the single-device result."""
    strategy = mirrored_strategy
    with strategy.scope():
        trainer = Trainer(build=False)
        status = tf_adamw.restore_training_variables(single_device_run["dir"],
                                                     trainer)
        trainer.optimizer.build(trainer.model.trainable_variables)
    status.assert_consumed()
    assert int(trainer.optimizer.iterations.numpy()) == 2

    step = _distributed_step(strategy, trainer)
    for s in range(N_STEPS, N_STEPS + M_STEPS):
        x, y = export_worker.batch(s)
        step(_shard(strategy, x), _shard(strategy, y))
    got = _distributed_state(strategy, trainer)
    want = single_device_run["final"]
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7,
                                   err_msg=key)


def test_restore_training_variables_rejects_a_mismatch(single_device_run,
                                                       tmp_path):
    other = tf.Module()
    other.model = make_model()
    other.optimizer = tf_adamw.AdamW(use_ema=False)  # fewer slots
    other.optimizer.build(other.model.trainable_variables)
    with pytest.raises(ValueError, match="do not match `module`"):
        tf_adamw.restore_training_variables(single_device_run["dir"], other)
    with pytest.raises(ValueError, match=r"variables\.index' does not exist"):
        tf_adamw.restore_training_variables(str(tmp_path), Trainer())


def test_savedmodel_loaded_under_a_strategy_silently_diverges(
        single_device_run, mirrored_strategy):
    """The caveat `restore_training_variables` exists for (pinned so that
    the documentation is updated if TensorFlow ever changes it): the loaded
    variables are mirrored, but the saved step has no all-reduce, so each
    replica applies its own shard's gradient and the copies drift apart
    without any error."""
    strategy = mirrored_strategy
    with strategy.scope():
        loaded = tf.saved_model.load(single_device_run["dir"])

    @tf.function
    def step(x, y):
        strategy.run(lambda a, b: loaded.train_step(a, b), args=(x, y))

    x, y = export_worker.batch(N_STEPS)
    step(_shard(strategy, x), _shard(strategy, y))  # one micro-step
    x, y = export_worker.batch(N_STEPS + 1)
    step(_shard(strategy, x), _shard(strategy, y))  # applies the update
    bias = loaded.model._layers[2].bias  # pylint: disable=protected-access
    copies = [c.numpy() for c in _copies(strategy, bias)]
    assert not all(np.array_equal(c, copies[0]) for c in copies[1:])
