"""Checkpointing: `tf.train.Checkpoint` tracks the whole optimizer state.

- A run saved after N calls, restored in a new process and continued for M
  calls ends bit-identical to the uninterrupted N+M run (amsgrad, EMA with
  overwrite, gradient accumulation saved mid-cycle, a Keras 3 schedule, and a
  hyperparameter changed before the save).
- Restoring into an unbuilt optimizer (deferred restoration: slots get their
  values when `build()` or the first apply creates them) and into a built one.
- A golden checkpoint written by an earlier version (`tests/golden/adamw_v1/`,
  see `tests/golden/make_golden.py`) keeps restoring, and the checkpoint key
  list is pinned: slot attribute names and order are API.
- The optimizer's checkpoint holds exactly `opt.variables`, never the model's
  variables.

This file doubles as the script the new process runs (see `_resume_main`).
"""

import json
import warnings
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_adamw  # noqa: E402
# To read what the slot guard records in a checkpoint's object graph.
from tensorflow.core.protobuf import trackable_object_graph_pb2  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GOLDEN = os.path.join(HERE, "golden", "adamw_v1")
GOLDEN_PREFIX = os.path.join(GOLDEN, "ckpt-1")

# ----------------------------------------------------------------------------
# The resumable run, shared by this process and the resumed process.

N_CALLS = 7  # 3 applied updates (k=2) + 1 pending micro-step at the save.
M_CALLS = 7  # then 4 more applied updates: overwrites happen at 3 and 6.
CHANGED_WEIGHT_DECAY = 0.02  # set on the saved run before call 2
RESUME_VARIANTS = ("build_then_restore", "restore_then_build",
                   "restore_then_apply")


def make_model(seed):
    model = tf.Module(name="model")
    rng = np.random.default_rng(seed)
    model.kernel = tf.Variable(
        rng.standard_normal((4, 3)).astype(np.float32), name="dense/kernel")
    model.bias = tf.Variable(
        rng.standard_normal(3).astype(np.float32), name="dense/bias")
    return model


def model_variables(model):
    return [model.kernel, model.bias]


def make_optimizer():
    schedule = keras.optimizers.schedules.ExponentialDecay(
        initial_learning_rate=0.05, decay_steps=2, decay_rate=0.7)
    return tf_adamw.AdamW(
        learning_rate=schedule,
        weight_decay=0.004,
        amsgrad=True,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=3,
        gradient_accumulation_steps=2,
    )


def make_train_step(model, opt):
    """A traced step; the gradient of call `c` depends on the weights and on
    a stateless random term seeded by `c` (elementwise ops only, so results
    are reproducible bit for bit in any process)."""
    variables = model_variables(model)

    @tf.function
    def train_step(call):
        with tf.GradientTape() as tape:
            loss = tf.constant(0.0)
            for j, v in enumerate(variables):
                noise = tf.random.stateless_normal(
                    v.shape, seed=tf.stack([call, tf.constant(j, tf.int64)]))
                loss += tf.reduce_sum(0.5 * tf.square(v - 1.0) + noise * v)
        grads = tape.gradient(loss, variables)
        return opt.apply_gradients(zip(grads, variables))

    return train_step


def run_calls(step, first, count):
    for c in range(first, first + count):
        step(tf.constant(c, tf.int64))


def state(model, opt):
    """Every model and optimizer value, by name."""
    out = {"model/kernel": model.kernel.numpy(),
           "model/bias": model.bias.numpy()}
    for v in opt.variables:
        assert f"opt/{v.name}" not in out, v.name
        out[f"opt/{v.name}"] = v.numpy()
    return out


def _resume_main(ckpt_path, out_path):
    """In a new process: restore `ckpt_path` three ways, continue M calls."""
    results = {}
    for variant in RESUME_VARIANTS:
        model, opt = make_model(seed=1), make_optimizer()
        ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
        if variant == "build_then_restore":
            opt.build(model_variables(model))
        status = ckpt.restore(ckpt_path)
        # The run changed weight_decay mid-way (as a callback would): take
        # the checkpoint's value, which a restore alone does not
        # (docs/semantics.md, "Checkpoint view").
        opt.use_restored_hyperparameters()
        if variant == "restore_then_build":
            opt.build(model_variables(model))
        if variant != "restore_then_apply":
            for k, v in state(model, opt).items():
                results[f"{variant}|restored|{k}"] = v
        step = make_train_step(model, opt)
        run_calls(step, N_CALLS, M_CALLS)
        try:
            status.assert_consumed()
            results[f"{variant}|consumed"] = np.array("ok")
        except AssertionError as e:
            results[f"{variant}|consumed"] = np.array(str(e)[:2000])
        for k, v in state(model, opt).items():
            results[f"{variant}|final|{k}"] = v
    np.savez(out_path, **results)


# ----------------------------------------------------------------------------
# Shared fixtures.


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """The uninterrupted run, its checkpoint after N calls, its end state."""
    tmp = tmp_path_factory.mktemp("resume")
    model, opt = make_model(seed=0), make_optimizer()
    step = make_train_step(model, opt)
    run_calls(step, 0, 2)
    opt.weight_decay = CHANGED_WEIGHT_DECAY  # the saved value, not the default
    run_calls(step, 2, N_CALLS - 2)
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(
        str(tmp / "ckpt"))
    saved = state(model, opt)
    run_calls(step, N_CALLS, M_CALLS)
    final = state(model, opt)
    return {"path": path, "saved": saved, "final": final, "tmp": tmp,
            "model": model, "opt": opt}


@pytest.fixture(scope="module")
def resumed(saved_run):
    """The same checkpoint resumed in a new process (one launch)."""
    out = saved_run["tmp"] / "resumed.npz"
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), saved_run["path"],
         str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail("the resumed process failed:\n" + proc.stderr[-4000:])
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def _pick(results, variant, phase):
    prefix = f"{variant}|{phase}|"
    return {k[len(prefix):]: v for k, v in results.items()
            if k.startswith(prefix)}


def _assert_states_equal(got, want, what):
    assert sorted(got) == sorted(want), what
    different = [k for k in want if got[k].dtype != want[k].dtype
                 or not np.array_equal(got[k], want[k])]
    assert not different, (
        f"{what}: not bit-identical: "
        + "; ".join(f"{k}: got {got[k].ravel()[:4]} want "
                    f"{want[k].ravel()[:4]}" for k in different))


# ----------------------------------------------------------------------------
# (a), (b): save, restore in a new process, continue.


def test_saved_state_is_nontrivial(saved_run):
    """Guards the resume tests: the saved state differs from a fresh one."""
    saved = saved_run["saved"]
    assert saved["opt/adamw/iteration:0"] == 3
    assert saved["opt/adamw/accumulation_count:0"] == 1
    assert saved["opt/adamw/weight_decay:0"] == np.float32(
        CHANGED_WEIGHT_DECAY)
    accumulators = [v for k, v in saved.items() if k.endswith("accumulator:0")]
    assert len(accumulators) == 2 and all(np.any(a != 0) for a in accumulators)
    for kind in ("momentum", "velocity", "velocity_hat", "average"):
        slots = [v for k, v in saved.items() if k.endswith(f"_{kind}:0")]
        assert len(slots) == 2 and all(np.any(s != 0) for s in slots), kind
    # The continued run moved everything again.
    final = saved_run["final"]
    assert final["opt/adamw/iteration:0"] == 7
    assert not np.array_equal(final["model/kernel"], saved["model/kernel"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", RESUME_VARIANTS)
def test_resume_in_new_process_is_bit_identical(saved_run, resumed, variant):
    if variant != "restore_then_apply":
        _assert_states_equal(_pick(resumed, variant, "restored"),
                             saved_run["saved"],
                             f"{variant}: values right after restoring")
    assert str(resumed[f"{variant}|consumed"]) == "ok", (
        f"{variant}: assert_consumed: {resumed[f'{variant}|consumed']}")
    _assert_states_equal(_pick(resumed, variant, "final"), saved_run["final"],
                         f"{variant}: after {M_CALLS} more calls")


def _restore_in_process(path, build_first):
    model, opt = make_model(seed=2), make_optimizer()
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    if build_first:
        opt.build(model_variables(model))
    status = ckpt.restore(path)
    opt.use_restored_hyperparameters()  # the run changed weight_decay
    if not build_first:
        assert not opt.built
        opt.build(model_variables(model))
    return model, opt, status


@pytest.mark.parametrize("build_first", [False, True],
                         ids=["restore_then_build", "build_then_restore"])
def test_restore_gives_every_slot_its_saved_value(saved_run, build_first):
    model, opt, status = _restore_in_process(saved_run["path"], build_first)
    saved_model, saved_opt = saved_run["model"], saved_run["opt"]
    for new_var, old_var in zip(model_variables(model),
                                model_variables(saved_model)):
        new_slots = opt.slots_for(new_var)
        old_slots = saved_opt.slots_for(old_var)
        assert sorted(new_slots) == sorted(old_slots)
        for kind, slot in new_slots.items():
            want = saved_run["saved"][f"opt/{old_slots[kind].name}"]
            np.testing.assert_array_equal(
                slot.numpy(), want, err_msg=f"{old_var.name} {kind}")
    _assert_states_equal(state(model, opt), saved_run["saved"], "restored")
    status.assert_consumed()


# ----------------------------------------------------------------------------
# Across replica counts (docs/semantics.md, "Distribution").


@pytest.mark.parametrize("build_first", [False, True],
                         ids=["restore_then_build", "build_then_restore"])
def test_checkpoint_restores_across_replica_counts(saved_run,
                                                   mirrored_strategy,
                                                   build_first, tmp_path):
    """1 device -> 4 replicas: every copy gets the saved value; then
    4 replicas -> 1 device gives the same values back."""
    with mirrored_strategy.scope():
        model, opt = make_model(seed=3), make_optimizer()
        ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
        if build_first:
            opt.build(model_variables(model))
        status = ckpt.restore(saved_run["path"])
        opt.use_restored_hyperparameters()  # the run changed weight_decay
        if not build_first:
            opt.build(model_variables(model))
    status.assert_consumed()
    saved = saved_run["saved"]
    for v in opt.variables:
        want = saved[f"opt/{v.name}"]
        copies = (mirrored_strategy.experimental_local_results(v)
                  if isinstance(v, tf.distribute.DistributedValues) else [v])
        for copy in copies:
            np.testing.assert_array_equal(copy.numpy(), want, err_msg=v.name)

    path = ckpt.save(str(tmp_path / "mirrored"))
    model, opt, status = _restore_in_process(path, build_first=True)
    status.assert_consumed()
    _assert_states_equal(state(model, opt), saved, "4 replicas -> 1 device")


# ----------------------------------------------------------------------------
# (c): the golden checkpoint.

# The key list of `tests/golden/adamw_v1`. Changing the optimizer's attribute
# names (e.g. renaming `_momentums`) breaks every checkpoint users hold.
PINNED_KEYS = [
    ("_CHECKPOINTABLE_OBJECT_GRAPH", []),
    ("model/bias/.ATTRIBUTES/VARIABLE_VALUE", [2]),
    ("model/kernel/.ATTRIBUTES/VARIABLE_VALUE", [3, 2]),
    ("optimizer/_accumulation_count/.ATTRIBUTES/VARIABLE_VALUE", []),
    ("optimizer/_accumulators/0/.ATTRIBUTES/VARIABLE_VALUE", [3, 2]),
    ("optimizer/_accumulators/1/.ATTRIBUTES/VARIABLE_VALUE", [2]),
    ("optimizer/_averages/0/.ATTRIBUTES/VARIABLE_VALUE", [3, 2]),
    ("optimizer/_averages/1/.ATTRIBUTES/VARIABLE_VALUE", [2]),
    ("optimizer/_beta_1/.ATTRIBUTES/VARIABLE_VALUE", []),
    ("optimizer/_beta_2/.ATTRIBUTES/VARIABLE_VALUE", []),
    ("optimizer/_epsilon/.ATTRIBUTES/VARIABLE_VALUE", []),
    ("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE", []),
    ("optimizer/_learning_rate/.ATTRIBUTES/VARIABLE_VALUE", []),
    ("optimizer/_momentums/0/.ATTRIBUTES/VARIABLE_VALUE", [3, 2]),
    ("optimizer/_momentums/1/.ATTRIBUTES/VARIABLE_VALUE", [2]),
    ("optimizer/_velocities/0/.ATTRIBUTES/VARIABLE_VALUE", [3, 2]),
    ("optimizer/_velocities/1/.ATTRIBUTES/VARIABLE_VALUE", [2]),
    ("optimizer/_velocity_hats/0/.ATTRIBUTES/VARIABLE_VALUE", [3, 2]),
    ("optimizer/_velocity_hats/1/.ATTRIBUTES/VARIABLE_VALUE", [2]),
    ("optimizer/_weight_decay/.ATTRIBUTES/VARIABLE_VALUE", []),
    ("save_counter/.ATTRIBUTES/VARIABLE_VALUE", []),
]


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(GOLDEN, "expected.json")) as f:
        return json.load(f)


def _keys(path):
    return [(name, list(shape)) for name, shape in
            tf.train.list_variables(path)]


def _golden_model(doc, zeros=True):
    model = tf.Module(name="model")
    for attr, name in doc["model_attributes"].items():
        init = np.array(doc["initial"][name], np.float32)
        setattr(model, attr, tf.Variable(np.zeros_like(init) if zeros else init,
                                         name=name))
    return model


def test_golden_checkpoint_has_the_pinned_keys(golden):
    assert _keys(GOLDEN_PREFIX) == [(k, s) for k, s in PINNED_KEYS]
    assert [tuple(x) for x in golden["checkpoint_keys"]] == [
        (k, s) for k, s in PINNED_KEYS]


def test_current_code_writes_the_pinned_keys(golden, tmp_path):
    """Same config and calls as the golden: the same key list, and the same
    values (the golden was written by this code's predecessor)."""
    model = _golden_model(golden, zeros=False)
    opt = tf_adamw.AdamW(**golden["config"])
    for kernel_grad, bias_grad in golden["gradients"]:
        opt.apply_gradients([
            (tf.constant(np.array(kernel_grad, np.float32)), model.kernel),
            (tf.constant(np.array(bias_grad, np.float32)), model.bias)])
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(
        str(tmp_path / "ckpt"))
    assert _keys(path) == [(k, s) for k, s in PINNED_KEYS]
    reader, golden_reader = (tf.train.load_checkpoint(path),
                             tf.train.load_checkpoint(GOLDEN_PREFIX))
    for key, _ in PINNED_KEYS[1:]:
        np.testing.assert_allclose(reader.get_tensor(key),
                                   golden_reader.get_tensor(key),
                                   rtol=1e-6, atol=1e-7, err_msg=key)


def _check_golden_values(model, opt, expected):
    assert int(opt.iterations.numpy()) == expected["iterations"]
    assert int(opt.variables[1].numpy()) == expected["accumulation_count"]
    assert opt.variables[1].name.endswith("accumulation_count:0")
    for name, value in expected["hyperparameters"].items():
        assert getattr(opt, name).numpy() == np.float32(value), name
    assert opt.learning_rate.numpy() == np.float32(expected["learning_rate"])
    by_name = {"dense/kernel": model.kernel, "dense/bias": model.bias}
    for name, entry in expected["variables"].items():
        variable = by_name[name]
        np.testing.assert_array_equal(
            variable.numpy(), np.array(entry["value"], np.float32),
            err_msg=name)
        slots = opt.slots_for(variable)
        assert sorted(slots) == sorted(k for k in entry if k != "value")
        for kind, slot in slots.items():
            np.testing.assert_array_equal(
                slot.numpy(), np.array(entry[kind], np.float32),
                err_msg=f"{name} {kind}")


@pytest.mark.parametrize("build_first", [False, True],
                         ids=["restore_then_build", "build_then_restore"])
def test_golden_checkpoint_restores_into_a_fresh_optimizer(golden,
                                                           build_first):
    model = _golden_model(golden)
    opt = tf_adamw.AdamW(**golden["config"])
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    if build_first:
        opt.build([model.kernel, model.bias])
    status = ckpt.restore(GOLDEN_PREFIX)
    if not build_first:
        opt.build([model.kernel, model.bias])
    _check_golden_values(model, opt, golden["expected"])
    status.assert_consumed()


def test_golden_expected_values_follow_the_spec(golden):
    """expected.json is not just "what the code did": a float64 NumPy
    reference of docs/semantics.md ("The step") gives the same values."""
    from numpy_reference import NumpyAdamW  # pylint: disable=import-outside-toplevel

    names = ["dense/kernel", "dense/bias"]
    ref = NumpyAdamW([golden["initial"][n] for n in names], **golden["config"])
    for grads in golden["gradients"]:
        ref.apply([np.array(g, np.float32) for g in grads])
    expected = golden["expected"]
    assert ref.iterations == expected["iterations"]
    slots = {"value": ref.variables, "momentum": ref.m, "velocity": ref.v,
             "velocity_hat": ref.v_hat, "average": ref.averages,
             "accumulator": ref.accumulators}
    for i, name in enumerate(names):
        for kind, values in slots.items():
            np.testing.assert_allclose(
                expected["variables"][name][kind], values[i], rtol=2e-5,
                atol=1e-7, err_msg=f"{name} {kind}")


# ----------------------------------------------------------------------------
# (d): the optimizer's checkpoint holds exactly `opt.variables`.


def _fill_distinct(variables, start):
    """Gives each variable a constant value unique to it; returns the map."""
    marks = {}
    for offset, v in enumerate(variables):
        mark = start + offset
        v.assign(tf.fill(tf.shape(v), tf.cast(mark, v.dtype)))
        marks[mark] = v
    return marks


def _marks_by_key(path, prefix):
    reader = tf.train.load_checkpoint(path)
    out = {}
    for key, _ in tf.train.list_variables(path):
        if not key.startswith(prefix):
            continue
        value = np.unique(reader.get_tensor(key))
        assert value.size == 1, key
        out[key] = int(value[0])
    return out


def test_checkpoint_holds_exactly_the_optimizer_variables(tmp_path):
    model = keras.Sequential([keras.Input((3,)),
                              keras.layers.Dense(4, name="hidden"),
                              keras.layers.Dense(1, name="out")])
    schedule = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=10)
    opt = tf_adamw.AdamW(learning_rate=schedule, amsgrad=True, use_ema=True,
                         gradient_accumulation_steps=2)
    opt.exclude_from_weight_decay(var_list=[model.layers[0].bias])
    grads = [tf.ones_like(v) for v in model.trainable_variables]
    opt.apply_gradients(zip(grads, model.trainable_variables))

    model_marks = _fill_distinct(model.variables, 1000)
    opt_marks = _fill_distinct(opt.variables, 2000)
    assert len(opt_marks) == 2 + 4 + 4 * 5  # counters, hypers, 4 vars x 5

    # The optimizer alone: every saved variable is one of opt.variables,
    # each exactly once; no model variable.
    alone = tf.train.Checkpoint(optimizer=opt).write(str(tmp_path / "opt"))
    marks = _marks_by_key(alone, "optimizer/")
    assert sorted(marks.values()) == sorted(opt_marks), (
        "keys not holding an optimizer variable: "
        f"{[k for k, m in marks.items() if m not in opt_marks]}")
    everything = [k for k, _ in tf.train.list_variables(alone)]
    assert len(everything) == len(opt_marks) + 1  # + the object graph

    # With the model: model keys hold the model, optimizer keys the optimizer.
    both = tf.train.Checkpoint(model=model, optimizer=opt).write(
        str(tmp_path / "both"))
    assert sorted(_marks_by_key(both, "optimizer/").values()) == sorted(
        opt_marks)
    assert sorted(_marks_by_key(both, "model/").values()) == sorted(
        model_marks)


if __name__ == "__main__":
    _resume_main(sys.argv[1], sys.argv[2])


# ----------------------------------------------------------------------------
# Hyperparameters are configuration, not state (docs/semantics.md,
# "Checkpoint view").

_OTHER_HYPERPARAMETERS = dict(learning_rate=0.5, weight_decay=0.0, beta_1=0.5,
                              beta_2=0.9, epsilon=1e-3)


def _saved_with_defaults(tmp_path):
    """A checkpoint of one applied step of `AdamW()` (default values)."""
    v = tf.Variable([1.0, -2.0, 3.0])
    opt = tf_adamw.AdamW()
    opt.apply_gradients([(tf.constant([0.5, 0.5, -1.0]), v)])
    return tf.train.Checkpoint(v=v, opt=opt).save(str(tmp_path / "ckpt")), opt


def _restore_with_other_values(path, fused):
    v = tf.Variable([0.0, 0.0, 0.0])
    opt = tf_adamw.AdamW(**_OTHER_HYPERPARAMETERS, fused=fused)
    opt.build([v])
    with pytest.warns(UserWarning) as record:
        tf.train.Checkpoint(v=v, opt=opt).restore(path).assert_consumed()
    return v, opt, [str(w.message) for w in record]


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "xla"])
def test_restore_keeps_the_configured_hyperparameters(tmp_path, fused):
    """Fine-tuning from a checkpoint written with other values trains at
    the values given to the constructor; each difference is a warning that
    names the hyperparameter and both values; state is restored."""
    path, saved_opt = _saved_with_defaults(tmp_path)
    v, opt, messages = _restore_with_other_values(path, fused)
    for name, value in _OTHER_HYPERPARAMETERS.items():
        assert float(getattr(opt, "_" + name).numpy()) == np.float32(value)
        assert opt.get_config()[name] == value
        default = tf_adamw.AdamW().get_config()[name]
        [message] = [m for m in messages if f" {name}=" in m]
        assert f"{name}={str(np.float32(default))}" in message, message
        assert f"{name}={value!r}" in message, message
    assert int(opt.iterations.numpy()) == 1  # state is restored
    np.testing.assert_array_equal(
        opt.slots_for(v)["momentum"].numpy(),
        saved_opt.slots_for(saved_opt.var_list[0])["momentum"].numpy())
    # The next step runs at the configured learning rate (0.5, not 0.001):
    # Adam's first steps move each element by about the learning rate.
    before = v.numpy().copy()
    opt.apply_gradients([(tf.constant([1.0, 1.0, 1.0]), v)])
    assert np.all(np.abs(v.numpy() - before) > 0.1)


def test_use_restored_hyperparameters_takes_the_checkpoints_values(tmp_path):
    path, _ = _saved_with_defaults(tmp_path)
    _, opt, _ = _restore_with_other_values(path, None)
    defaults = tf_adamw.AdamW().get_config()
    assert set(opt.restored_hyperparameters) == set(_OTHER_HYPERPARAMETERS)
    opt.use_restored_hyperparameters()
    for name in _OTHER_HYPERPARAMETERS:
        assert float(getattr(opt, "_" + name).numpy()) == np.float32(
            defaults[name]), name


def test_restore_under_a_strategy_keeps_the_configured_values(
        tmp_path, mirrored_strategy):
    """4 replicas: every copy keeps the configured value."""
    path, _ = _saved_with_defaults(tmp_path)
    with mirrored_strategy.scope():
        v = tf.Variable([0.0, 0.0, 0.0])
        opt = tf_adamw.AdamW(**_OTHER_HYPERPARAMETERS)
        opt.build([v])
    with pytest.warns(UserWarning, match="learning_rate=0.5"):
        tf.train.Checkpoint(v=v, opt=opt).restore(path).assert_consumed()
    for copy in opt.learning_rate.values:
        assert float(copy.numpy()) == 0.5
    assert int(opt.iterations.numpy()) == 1


def test_equal_hyperparameters_restore_without_a_warning(tmp_path):
    path, _ = _saved_with_defaults(tmp_path)
    v = tf.Variable([0.0, 0.0, 0.0])
    opt = tf_adamw.AdamW()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf.train.Checkpoint(v=v, opt=opt).restore(path).expect_partial()
    assert opt.restored_hyperparameters["learning_rate"] == pytest.approx(
        0.001)


# ----------------------------------------------------------------------------
# Slots follow their variables: a checkpoint whose slots belong to other
# variables is refused, before anything changes.


def _two_trained(amsgrad=False, names=("x", "y"), shapes=((3,), (3,))):
    variables = [tf.Variable(np.full(s, 1.0 + i, np.float32), name=n)
                 for i, (n, s) in enumerate(zip(names, shapes))]
    opt = tf_adamw.AdamW(amsgrad=amsgrad)
    opt.apply_gradients(
        [(tf.fill(v.shape, 0.5 + i), v) for i, v in enumerate(variables)])
    return variables, opt


def _save_two(tmp_path, **kwargs):
    variables, opt = _two_trained(**kwargs)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(opt=opt), str(tmp_path / "two"), max_to_keep=1)
    manager.save()
    return str(tmp_path / "two"), manager.latest_checkpoint


def _all_values(opt, variables):
    return [np.array(c.numpy()) for v in variables + opt.variables
            for c in getattr(v, "values", (v,))]


def _built_in_reverse(replicas, mirrored_strategy):
    """Variables x and y, and an optimizer built with `[y, x]` on 1 device
    or 4 replicas."""
    strategy = (mirrored_strategy if replicas == 4
                else tf.distribute.get_strategy())
    with strategy.scope():
        x = tf.Variable(np.zeros(3, np.float32), name="x")
        y = tf.Variable(np.zeros(3, np.float32), name="y")
        opt = tf_adamw.AdamW()
        opt.build([y, x])
    return x, y, opt


@pytest.mark.parametrize("replicas", [1, 4])
def test_restore_latest_good_refuses_variables_in_another_order(
        tmp_path, replicas, mirrored_strategy):
    """Same variables, built in another order (as renaming a `tf.Module`
    attribute does): an error naming both, and nothing changes."""
    directory, _ = _save_two(tmp_path)
    x, y, opt = _built_in_reverse(replicas, mirrored_strategy)
    before = _all_values(opt, [x, y])
    with pytest.raises(ValueError, match=r"another order: momentum slot 0 is "
                       r"'adamw/x_momentum' in the checkpoint but "
                       r"'adamw/y_momentum' here"):
        tf_adamw.restore_latest_good(tf.train.Checkpoint(opt=opt), directory)
    for got, want in zip(_all_values(opt, [x, y]), before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case, match", [
    ("order", "another order"),
    ("shape", r"shape \[3\] in the checkpoint"),
    ("more", "for 2 variables but this optimizer is built with 1"),
    ("amsgrad", "velocity_hat"),
])
def test_restore_then_build_refuses_slots_of_other_variables(
        tmp_path, case, match):
    """A plain `tf.train.Checkpoint.restore` into an unbuilt optimizer:
    `build()` checks the slots waiting for it and builds nothing when they
    belong to other variables; built right, they get their values."""
    _, path = _save_two(tmp_path)
    x = tf.Variable(np.zeros(3, np.float32), name="x")
    y = tf.Variable(np.zeros(4 if case == "shape" else 3, np.float32),
                    name="y")
    wrong = {"order": [y, x], "shape": [x, y], "more": [x],
             "amsgrad": [x, y]}[case]
    opt = tf_adamw.AdamW(amsgrad=case == "amsgrad")
    tf.train.Checkpoint(opt=opt).restore(path).expect_partial()
    with pytest.raises(ValueError, match=match):
        opt.build(wrong)
    assert not opt.built and not opt.var_list
    assert len(opt.variables) == 6  # iterations + 5 hyperparameters: no slot
    if case == "order":
        opt.build([x, y])  # the pending values still arrive
        _, saved = _two_trained()
        np.testing.assert_array_equal(
            opt.slots_for(y)["momentum"].numpy(),
            saved.slots_for(saved.var_list[1])["momentum"].numpy())


@pytest.mark.parametrize("saved_amsgrad", [True, False])
def test_restore_latest_good_refuses_an_amsgrad_mismatch(tmp_path,
                                                         saved_amsgrad):
    directory, _ = _save_two(tmp_path, amsgrad=saved_amsgrad)
    x = tf.Variable(np.zeros(3, np.float32), name="x")
    y = tf.Variable(np.zeros(3, np.float32), name="y")
    opt = tf_adamw.AdamW(amsgrad=not saved_amsgrad)
    opt.build([x, y])
    with pytest.raises(ValueError, match="nothing was restored"):
        tf_adamw.restore_latest_good(tf.train.Checkpoint(opt=opt), directory)
    assert int(opt.iterations.numpy()) == 0


def test_restore_latest_good_refuses_a_checkpoint_of_more_variables(
        tmp_path):
    directory, _ = _save_two(tmp_path)
    x = tf.Variable(np.zeros(3, np.float32), name="x")
    opt = tf_adamw.AdamW()
    opt.build([x])
    with pytest.raises(ValueError, match="for 2 variables but this "
                       "optimizer is built with 1"):
        tf_adamw.restore_latest_good(tf.train.Checkpoint(opt=opt), directory)
    assert int(opt.iterations.numpy()) == 0


# ----------------------------------------------------------------------------
# A plain `tf.train.Checkpoint.restore` into a built optimizer: the slot guard
# (tf_adamw/slot_guard.py) refuses other variables' slots before anything,
# the model's variables included, is assigned.


def _save_plain(tmp_path, **kwargs):
    """`tf.train.Checkpoint(opt=..., x=..., y=...).save` of `_two_trained`
    (with one variable when `names` has one)."""
    variables, opt = _two_trained(**kwargs)
    named = {v.name.split(":")[0]: v for v in variables}
    return tf.train.Checkpoint(opt=opt, **named).save(str(tmp_path / "plain"))


def _slot_guard_record(path, optimizer_key):
    """What the slot guard of the optimizer at `optimizer_key` recorded in
    the checkpoint at `path`: the name of its one child, in the object
    graph (no tensor). None when there is no guard."""
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(tf.train.load_checkpoint(path).get_tensor(
        "_CHECKPOINTABLE_OBJECT_GRAPH"))
    node = graph.nodes[0]
    for name in (optimizer_key, "_slot_guard"):
        ids = [c.node_id for c in node.children if c.local_name == name]
        if not ids:
            return None
        node = graph.nodes[ids[0]]
    [record] = node.children
    return json.loads(record.local_name)


def _assert_refused_unchanged(path, opt, variables, match):
    """A plain restore of `path` into `opt` and `variables` raises a
    `ValueError` matching `match`; no value of either changed."""
    before = _all_values(opt, variables)
    named = {v.name.split(":")[0]: v for v in variables}
    with pytest.raises(ValueError, match=match):
        tf.train.Checkpoint(opt=opt, **named).restore(path)
    after = _all_values(opt, variables)
    assert len(after) == len(before)
    for got, want in zip(after, before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("replicas", [1, 4])
def test_plain_restore_into_a_built_optimizer_refuses_another_order(
        tmp_path, replicas, mirrored_strategy):
    """Built with the same variables in another order: an error naming
    both, and neither the optimizer (slots, counters, hyperparameters) nor
    the model's variables change."""
    path = _save_plain(tmp_path)
    x, y, opt = _built_in_reverse(replicas, mirrored_strategy)
    _assert_refused_unchanged(
        path, opt, [x, y],
        r"another order: momentum slot 0 is 'adamw/x_momentum' in the "
        r"checkpoint but 'adamw/y_momentum' here")
    assert int(opt.iterations.numpy()) == 0


@pytest.mark.parametrize("case, match", [
    ("more", "momentum slots for 2 variables but this optimizer is built "
             "with 1"),
    ("fewer", "momentum slots for 1 variables but this optimizer is built "
              "with 2"),
    ("shape", r"momentum slot 1 has shape \[3\] in the checkpoint "
              r"\('adamw/y_momentum'\) but \[4\] here"),
    ("amsgrad_into_adam", r"slots \['momentum', 'velocity', "
                          r"'velocity_hat'\] but this optimizer keeps "
                          r"\['momentum', 'velocity'\]"),
    ("adam_into_amsgrad", r"slots \['momentum', 'velocity'\] but this "
                          r"optimizer keeps \['momentum', 'velocity', "
                          r"'velocity_hat'\]"),
])
def test_plain_restore_into_a_built_optimizer_refuses_other_slots(
        tmp_path, case, match):
    """A checkpoint of more or fewer variables, of other shapes, or with
    other slot kinds (AMSGrad either way): refused, nothing changes."""
    saved = {"fewer": dict(names=("x",), shapes=((3,),)),
             "amsgrad_into_adam": dict(amsgrad=True)}.get(case, {})
    path = _save_plain(tmp_path, **saved)
    x = tf.Variable(np.zeros(3, np.float32), name="x")
    y = tf.Variable(np.zeros(4 if case == "shape" else 3, np.float32),
                    name="y")
    opt = tf_adamw.AdamW(amsgrad=case == "adam_into_amsgrad")
    variables = [x] if case == "more" else [x, y]
    opt.build(variables)
    _assert_refused_unchanged(path, opt, variables, match)


@pytest.mark.parametrize("names", [("x", "y"), ("a", "b")],
                         ids=["same_names", "renamed"])
def test_plain_restore_into_a_built_optimizer_with_the_same_variables(
        tmp_path, names):
    """The checkpoint records its slots' variables (adding no tensor);
    built with the same variables, a plain restore gives every value back
    exactly. Variable names do not matter (only another order of the same
    names is refused)."""
    path = _save_plain(tmp_path)
    assert _slot_guard_record(path, "opt")["slots"] == {
        "momentum": [["adamw/x_momentum", [3]], ["adamw/y_momentum", [3]]],
        "velocity": [["adamw/x_velocity", [3]], ["adamw/y_velocity", [3]]]}
    x, y = (tf.Variable(np.zeros(3, np.float32), name=n) for n in names)
    opt = tf_adamw.AdamW()
    opt.build([x, y])
    tf.train.Checkpoint(opt=opt, x=x, y=y).restore(path).assert_consumed()
    saved_variables, saved = _two_trained()
    got, want = _all_values(opt, [x, y]), _all_values(saved, saved_variables)
    assert len(got) == len(want) == 2 + 6 + 4
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_golden_checkpoint_without_a_slot_guard_still_restores(golden,
                                                               tmp_path):
    """A checkpoint written before the slot guard restores into a built
    optimizer as before, plainly and by `restore_latest_good`; the next save
    adds the guard's record (no key), naming the slots' variables."""
    assert _slot_guard_record(GOLDEN_PREFIX, "optimizer") is None
    for resume in ("plain", "restore_latest_good"):
        model = _golden_model(golden)
        opt = tf_adamw.AdamW(**golden["config"])
        opt.build([model.kernel, model.bias])
        ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
        if resume == "plain":
            ckpt.restore(GOLDEN_PREFIX).assert_consumed()
        else:
            directory = str(tmp_path / "golden")
            shutil.copytree(GOLDEN, directory)
            prefix = os.path.join(directory, "ckpt-1")
            tf.compat.v1.train.update_checkpoint_state(directory, prefix)
            assert tf_adamw.restore_latest_good(ckpt, directory) == prefix
        _check_golden_values(model, opt, golden["expected"])
    path = ckpt.save(str(tmp_path / "upgraded"))
    assert _keys(path) == [(k, s) for k, s in PINNED_KEYS]
    record = _slot_guard_record(path, "optimizer")
    assert [name for name, _ in record["slots"]["momentum"]] == [
        "adamw/dense_kernel_momentum", "adamw/dense_bias_momentum"]
