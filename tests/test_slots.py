"""`tf_adamw.slots`: packed slots (`slot_layout="packed"`).

A packed optimizer keeps each variable's slots as the rows of one variable.
It must be the separate layout's optimizer in every other respect: the same
values (bit for bit without XLA, to rounding under it, where XLA may fuse
the two layouts' arithmetic differently), the same checkpoint keys and
values (checkpoints of either layout restore into the other), a training
SavedModel that resumes, views that read, assign and convert like slot
variables, and half the buffers per variable under XLA (the point of it).
Replicas: tests/test_distribute.py.
"""

import copy
import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

import tf_adamw
from tf_adamw import export
from tf_adamw import slots as slots_lib

SHAPES = [[3, 2], [4], [], [2, 2, 2]]
CASES = {
    "ema_clip_amsgrad": dict(use_ema=True, global_clipnorm=0.5,
                             amsgrad=True),
    "accumulation_ema_overwrite": dict(
        gradient_accumulation_steps=2, use_ema=True, ema_momentum=0.5,
        ema_overwrite_frequency=2),
    "guard_clipnorm": dict(skip_nonfinite_gradients=True, clipnorm=0.3),
    "clipvalue_dynamic_scale": dict(clipvalue=0.2, loss_scale="dynamic",
                                    initial_scale=4.0,
                                    dynamic_growth_steps=2),
}
STEPS = 5
MISSING_STEP = 2  # variable 1 has no gradient in this call
NAN_STEP = 3  # a NaN in variable 0's gradient in this call


def _variables():
    rng = np.random.default_rng(3)
    return [tf.Variable(rng.normal(size=s).astype(np.float32),
                        name=f"v{i}") for i, s in enumerate(SHAPES)]


def _grads(step):
    rng = np.random.default_rng(100 + step)
    grads = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    if step == NAN_STEP:
        grads[0] = np.full(SHAPES[0], np.nan, np.float32)
    return grads


def _optimizer(layout, case, jit_compile=True, fused=False):
    return tf_adamw.AdamW(learning_rate=0.05, weight_decay=0.1,
                          slot_layout=layout, fused=fused,
                          jit_compile=jit_compile, **CASES[case])


def _state(optimizer, variables):
    out = {"iterations": optimizer.iterations.numpy()}
    for i, v in enumerate(variables):
        out[f"v{i}"] = v.numpy()
        for kind, slot in optimizer.slots_for(v).items():
            out[f"v{i}/{kind}"] = slot.numpy()
    return out


def _train(layout, case, mode, jit_compile, fused=False):
    """`STEPS` calls; the state after each. `mode`: "eager" (the
    optimizer's own step), "function" or "user_jit" (the user's
    `tf.function`, plain or `jit_compile=True`)."""
    variables = _variables()
    optimizer = _optimizer(layout, case, jit_compile, fused)
    optimizer.build(variables)
    assert optimizer.uses_fused_kernel == (fused is None)

    def apply(grads, variables):
        optimizer.apply_gradients(zip(grads, variables))

    if mode != "eager":
        apply = tf.function(apply, jit_compile=mode == "user_jit")
    history = []
    for step in range(STEPS):
        grads = [tf.constant(g) for g in _grads(step)]
        pairs = list(zip(grads, variables))
        if step == MISSING_STEP:
            del pairs[1]
        if case != "guard_clipnorm" and step == NAN_STEP:
            pairs[0] = (tf.zeros_like(pairs[0][0]), pairs[0][1])
        apply([g for g, _ in pairs], [v for _, v in pairs])
        history.append(_state(optimizer, variables))
    return history


def _assert_same(got, want, exact):
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        for key in w:
            if exact:
                np.testing.assert_array_equal(
                    g[key], w[key], err_msg=f"step {step}: {key}")
            else:
                np.testing.assert_allclose(
                    g[key], w[key], rtol=1e-6, atol=1e-7,
                    err_msg=f"step {step}: {key}")


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_equals_separate_bit_for_bit_without_xla(case, mode):
    _assert_same(_train("packed", case, mode, jit_compile=False),
                 _train("separate", case, mode, jit_compile=False),
                 exact=True)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_equals_separate_bit_for_bit_in_the_fused_kernel(case, mode):
    """The kernel reads and writes each slot as a row of its packed
    variable: the same numbers as with separate slots (and as the plain
    ops: tests/test_kernels.py)."""
    _assert_same(_train("packed", case, mode, jit_compile=False, fused=None),
                 _train("separate", case, mode, jit_compile=False,
                        fused=None),
                 exact=True)


def _kernel_beside_accumulation_in_ops(layout):
    """A `tf.function` step of the fused kernel with gradient accumulation
    in TF ops (variable 1 never has a gradient, so the kernel does not
    accumulate): `(optimizer, variables, concrete function)`."""
    rng = np.random.default_rng(5)
    variables = [tf.Variable(rng.normal(size=SHAPES[i % 4]).astype(
        np.float32)) for i in range(12)]
    optimizer = tf_adamw.AdamW(learning_rate=0.05, weight_decay=0.1,
                               slot_layout=layout, fused=None, use_ema=True,
                               gradient_accumulation_steps=2)
    optimizer.build(variables)
    assert optimizer.uses_fused_kernel
    given = [v for i, v in enumerate(variables) if i != 1]
    step = tf.function(
        lambda grads: optimizer.apply_gradients(zip(grads, given)))
    return optimizer, variables, step.get_concrete_function(
        [tf.TensorSpec(v.shape, tf.float32) for v in given])


def test_packed_accumulators_beside_the_kernel_are_written_after_it():
    """Accumulators written by TF ops beside the kernel: a packed one is
    written with its variable's other rows, which the kernel writes out of
    TF's sight, so the write waits for the kernel (else it may put back
    the rows as they were before it, depending on the executor's order:
    the bit-for-bit comparison alone passed in one of the two runs tried
    before the fix)."""
    optimizer, variables, concrete = _kernel_beside_accumulation_in_ops(
        "packed")
    graph = concrete.graph
    inner = {id(external): internal for external, internal in graph.captures}
    stores = {id(inner[id(optimizer.slots_for(v)["momentum"].store.handle)])
              for v in variables}
    kernels = {op for op in graph.get_operations()
               if op.type == "TfAdamwFusedApply"}
    assert kernels

    def after_a_kernel(op, seen):
        if op in kernels:
            return True
        seen.add(op)
        return any(after_a_kernel(o, seen) for o in
                   [t.op for t in op.inputs] + list(op.control_inputs)
                   if o not in seen)

    writes = [op for op in graph.get_operations()
              if op.type == "AssignVariableOp"
              and id(op.inputs[0]) in stores]
    assert len(writes) == len(variables) + 1  # accumulators, 1's average
    assert all(after_a_kernel(op, set()) for op in writes)
    # The numbers: those of separate slots.
    states = {}
    for layout in ("packed", "separate"):
        optimizer, variables, concrete = _kernel_beside_accumulation_in_ops(
            layout)
        states[layout] = []
        for step in range(6):
            rng = np.random.default_rng(200 + step)
            concrete([tf.constant(rng.normal(size=v.shape).astype(
                np.float32)) for i, v in enumerate(variables) if i != 1])
            states[layout].append(_state(optimizer, variables))
    _assert_same(states["packed"], states["separate"], exact=True)


@pytest.mark.parametrize("mode", ["eager", "user_jit"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_equals_separate_under_xla(case, mode):
    """The optimizer's own XLA step, and the whole step in the user's
    `jit_compile=True` function."""
    _assert_same(_train("packed", case, mode, jit_compile=True),
                 _train("separate", case, mode, jit_compile=True),
                 exact=False)


def _resource_inputs(layout, n, **options):
    variables = [tf.Variable(tf.ones(SHAPES[i % 2])) for i in range(n)]
    optimizer = tf_adamw.AdamW(slot_layout=layout, **options)
    optimizer.build(variables)
    function = tf.function(lambda grads: optimizer.apply(grads, variables),
                           jit_compile=True)
    concrete = function.get_concrete_function(
        [tf.TensorSpec(v.shape, tf.float32) for v in variables])
    return sum(t.dtype == tf.resource for t in concrete.captured_inputs)


@pytest.mark.parametrize("options", [
    dict(use_ema=True, global_clipnorm=1.0),
    dict(use_ema=True, amsgrad=True, gradient_accumulation_steps=2)])
def test_under_xla_each_variable_passes_two_buffers(options):
    """What makes packed slots fast under XLA: the step's buffers per
    variable are the variable and its packed slots, not one per slot."""
    per_variable = {
        layout: (_resource_inputs(layout, 12, **options)
                 - _resource_inputs(layout, 4, **options)) / 8
        for layout in ("packed", "separate")}
    kinds = 2 + options.get("amsgrad", False) + options["use_ema"] + bool(
        options.get("gradient_accumulation_steps"))
    assert per_variable == {"packed": 2, "separate": 1 + kinds}


@pytest.mark.parametrize("step", ["fused", "ops", "xla", "user_jit"])
@pytest.mark.parametrize("layout", ["separate", "packed"])
def test_slots_of_one_shape_share_their_zeros_not_their_writes(
        layout, step, monkeypatch):
    """`build()` makes one zeros tensor per shape and dtype for all slots
    (a `tf.zeros` each was a fifth of it on 1,000 variables); every way a
    step writes them (the fused kernel, TF ops, XLA) gives each its own
    values, in the first step (buffers still shared) and the second."""
    made = []
    zeros = tf.zeros
    monkeypatch.setattr(tf, "zeros", lambda *a, **k: made.append(a[0])
                        or zeros(*a, **k))
    variables = [tf.Variable(tf.ones([4]) * i) for i in range(3)]
    variables.append(tf.Variable(tf.ones([2, 2])))
    optimizer = tf_adamw.AdamW(
        beta_1=0.5, use_ema=True, ema_momentum=0.5, slot_layout=layout,
        fused=step == "fused", jit_compile=step == "xla")
    optimizer.build(variables)
    monkeypatch.setattr(tf, "zeros", zeros)
    assert len(made) == 2, made  # [4] and [2, 2] (or [k, 4] and [k, 2, 2])

    def apply(grads):
        optimizer.apply(grads, variables)

    if step in ("ops", "user_jit"):
        apply = tf.function(apply, jit_compile=step == "user_jit")
    grads = [tf.fill(v.shape, float(i + 1)) for i, v in enumerate(variables)]
    for n, first_momentum in ((1, 0.5), (2, 0.75)):
        apply(grads)
        for i, variable in enumerate(variables):
            np.testing.assert_allclose(
                optimizer.slots_for(variable)["momentum"].numpy(),
                np.full(variable.shape, first_momentum * (i + 1)),
                err_msg=f"{layout} {step} step {n} variable {i}")
    averages = [optimizer.slots_for(v)["average"].numpy() for v in variables]
    assert len({a.tobytes() for a in averages[:3]}) == 3, averages


def test_the_packed_variable_holds_the_slots_as_rows():
    variables = _variables()
    optimizer = tf_adamw.AdamW(slot_layout="packed", use_ema=True,
                               amsgrad=True)
    optimizer.apply_gradients(zip([tf.ones(s) for s in SHAPES], variables))
    views = optimizer.slots_for(variables[0])
    assert list(views) == ["momentum", "velocity", "velocity_hat",
                           "average"]
    store = views["momentum"].store
    assert store.shape == [4] + SHAPES[0]
    assert store.name == "adamw/v0_slots:0"
    for row, (kind, view) in enumerate(views.items()):
        assert isinstance(view, slots_lib.SlotView)
        assert view.store is store and view.row == row
        assert view.name == f"adamw/v0_{kind}:0"
        assert view.shape == SHAPES[0] and view.dtype == tf.float32
        np.testing.assert_array_equal(view.numpy(), store.numpy()[row])
        np.testing.assert_array_equal(tf.convert_to_tensor(view),
                                      store.numpy()[row])
        np.testing.assert_array_equal(np.asarray(view), store.numpy()[row])
    assert optimizer.uses_fused_kernel
    assert "row 0 of 'adamw/v0_slots:0'" in repr(views["momentum"])
    # `variables` lists the views, as the separate layout lists its slots.
    assert [v.name for v in optimizer.variables[-4:]] == [
        "adamw/v3_momentum:0", "adamw/v3_velocity:0",
        "adamw/v3_velocity_hat:0", "adamw/v3_average:0"]


def test_a_view_assigns_its_row_only():
    variables = _variables()
    optimizer = tf_adamw.AdamW(slot_layout="packed", use_ema=True)
    optimizer.apply_gradients(zip([tf.ones(s) for s in SHAPES], variables))
    views = optimizer.slots_for(variables[0])
    before = views["momentum"].store.numpy()
    views["velocity"].assign(np.full(SHAPES[0], 7.0, np.float32))
    after = views["momentum"].store.numpy()
    np.testing.assert_array_equal(after[1], 7.0)
    np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
    with pytest.raises(ValueError, match=r"shape \(4,\).*'adamw/v0_average'"):
        views["average"].assign(np.zeros(4, np.float32))
    np.testing.assert_array_equal(views["momentum"].store.numpy(), after)


def test_ema_helpers_read_the_views():
    variables = _variables()
    optimizer = tf_adamw.AdamW(slot_layout="packed", use_ema=True,
                               ema_momentum=0.5)
    for step in range(3):
        optimizer.apply_gradients(zip(_grads(step), variables))
    averages = [a.numpy() for a in optimizer.moving_averages()]
    values = [v.numpy() for v in variables]
    with tf_adamw.ema_weights(optimizer):
        for variable, average in zip(variables, averages):
            np.testing.assert_array_equal(variable.numpy(), average)
    for variable, value in zip(variables, values):
        np.testing.assert_array_equal(variable.numpy(), value)
    optimizer.finalize_variable_values(variables)
    for variable, average in zip(variables, averages):
        np.testing.assert_array_equal(variable.numpy(), average)


# ----------------------------------------------------------------------------
# Checkpoints, SavedModel, copies.


def _trained(layout, build=True, steps=3):
    variables = _variables()
    optimizer = _optimizer(layout, "ema_clip_amsgrad", jit_compile=False)
    if build:
        optimizer.build(variables)
    for step in range(steps):
        optimizer.apply_gradients(zip(_grads(step), variables))
    return variables, optimizer


@pytest.mark.parametrize("built", [True, False], ids=["built", "deferred"])
@pytest.mark.parametrize("source,target", [("separate", "packed"),
                                           ("packed", "separate"),
                                           ("packed", "packed")])
def test_checkpoints_are_the_same_in_both_layouts(tmp_path, source, target,
                                                  built):
    variables, optimizer = _trained(source)
    path = tf.train.Checkpoint(optimizer=optimizer, variables=variables).save(
        str(tmp_path / "ckpt"))
    keys = {k: s for k, s in tf.train.list_variables(path)
            if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}
    _, separate = _trained("separate", steps=0)
    reference = tf.train.Checkpoint(
        optimizer=separate, variables=_variables()).save(
            str(tmp_path / "reference"))
    assert keys == {k: s for k, s in tf.train.list_variables(reference)
                    if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}
    restored_variables, restored = _trained(target, build=built, steps=0)
    status = tf.train.Checkpoint(
        optimizer=restored, variables=restored_variables).restore(path)
    if not built:
        restored.build(restored_variables)
    status.assert_consumed()
    assert restored.iterations.numpy() == optimizer.iterations.numpy()
    for a, b in zip(restored_variables, variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        for kind, slot in optimizer.slots_for(b).items():
            np.testing.assert_array_equal(
                restored.slots_for(a)[kind].numpy(), slot.numpy())


@pytest.mark.parametrize("source", ["separate", "packed"])
def test_a_checkpoint_of_other_variables_is_refused(tmp_path, source):
    """Built: the restore is refused; unbuilt: `build()` refuses the
    variables (the names of packed slots, which TF does not record for
    objects that are no variables, come from the slot guard's record)."""
    _, optimizer = _trained(source)
    path = tf.train.Checkpoint(optimizer=optimizer).save(
        str(tmp_path / "ckpt"))
    swapped = _variables()
    swapped[0], swapped[2] = swapped[2], swapped[0]
    swapped[0].assign(tf.ones_like(swapped[0]))
    packed = _optimizer("packed", "ema_clip_amsgrad")
    packed.build(swapped)
    before = [s.numpy() for s in packed.variables]
    with pytest.raises(ValueError, match="belong to other variables"):
        tf.train.Checkpoint(optimizer=packed).restore(path)
    for value, slot in zip(before, packed.variables):
        np.testing.assert_array_equal(slot.numpy(), value)
    # Same shapes in another order: only the names tell.
    same_shapes = [tf.Variable(tf.ones([2]), name=n) for n in ("a", "b")]
    first = _optimizer(source, "ema_clip_amsgrad")
    first.apply_gradients(zip([tf.ones([2])] * 2, same_shapes))
    path = tf.train.Checkpoint(optimizer=first).save(str(tmp_path / "ab"))
    unbuilt = _optimizer("packed", "ema_clip_amsgrad")
    tf.train.Checkpoint(optimizer=unbuilt).restore(path)
    with pytest.raises(ValueError, match="another order"):
        unbuilt.build(same_shapes[::-1])
    assert not unbuilt.built


def _module():
    module = tf.Module()
    module.variables_ = _variables()
    module.optimizer = tf_adamw.AdamW(
        learning_rate=0.05, slot_layout="packed", use_ema=True,
        global_clipnorm=0.5)
    module.optimizer.build(module.variables_)

    @tf.function(input_signature=[tf.TensorSpec(s, tf.float32)
                                  for s in SHAPES])
    def train_step(*grads):
        module.optimizer.apply_gradients(zip(grads, module.variables_))
        return module.optimizer.iterations

    module.train_step = train_step
    return module


def test_a_training_savedmodel_resumes(tmp_path):
    module = _module()
    module.train_step(*_grads(0))
    export.export_training_model(str(tmp_path / "model"), module)
    loaded = tf.saved_model.load(str(tmp_path / "model"))
    rebuilt = _module()
    export.restore_training_variables(str(tmp_path / "model"), rebuilt)
    for step in range(1, 4):
        for m in (module, loaded, rebuilt):
            m.train_step(*_grads(step))
    for a, b, c in zip(module.variables_, loaded.variables_,
                       rebuilt.variables_):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
        np.testing.assert_array_equal(c.numpy(), a.numpy())
    for a, c in zip(module.variables_, rebuilt.variables_):
        for kind, slot in module.optimizer.slots_for(a).items():
            np.testing.assert_array_equal(
                rebuilt.optimizer.slots_for(c)[kind].numpy(), slot.numpy())


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_copies_keep_the_packed_state(how):
    variables, optimizer = _trained("packed")
    if how == "pickle":
        copied = pickle.loads(pickle.dumps(optimizer))
    else:
        copied = copy.deepcopy(optimizer)
    assert copied.get_config()["slot_layout"] == "packed"
    for a, b in zip(copied.var_list, variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        for kind, slot in optimizer.slots_for(b).items():
            got = copied.slots_for(a)[kind]
            assert isinstance(got, slots_lib.SlotView)
            np.testing.assert_array_equal(got.numpy(), slot.numpy())


# ----------------------------------------------------------------------------
# The option.


def test_slot_layout_is_checked_and_configured():
    with pytest.raises(ValueError, match=r"`slot_layout`.*'flat'"):
        tf_adamw.AdamW(slot_layout="flat")
    with pytest.raises(ValueError, match=r"`slot_layout`.*None"):
        tf_adamw.AdamW(slot_layout=None)
    assert "slot_layout" not in tf_adamw.AdamW().get_config()
    config = tf_adamw.AdamW(slot_layout="packed").get_config()
    assert config["slot_layout"] == "packed"
    assert tf_adamw.AdamW.from_config(config).get_config() == config


def test_the_kernel_checks_packed_slot_tables():
    """The op's own checks, for a table built by hand: the row count
    matches the kinds held, and each packed variable has that many rows
    of its model variable's size (a bad input changes nothing)."""
    from tf_adamw import kernels  # pylint: disable=import-outside-toplevel
    variable = tf.Variable(tf.ones([2, 3]))
    store = tf.Variable(tf.zeros([2, 2, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="packed_rows is 3 but the table holds 2"):
        kernels.slot_table([store], [store], [], packed_rows=3)
    scalars = dict(alpha=tf.constant(0.1), one_minus_beta_1=tf.constant(0.1),
                   one_minus_beta_2=tf.constant(0.001),
                   epsilon=tf.constant(1e-7), decay=tf.constant(0.0))
    table = kernels.slot_table([store], [store], [], packed_rows=2)
    kernels.fused_apply([variable], table, [0], [tf.ones([2, 3])],
                        use_decay=[False], **scalars)
    np.testing.assert_allclose(store.numpy()[0], 0.1)  # momentum row
    np.testing.assert_allclose(store.numpy()[1], 0.001)  # velocity row
    short = tf.Variable(tf.zeros([1, 2, 3]))
    table = kernels.slot_table([short], [short], [], packed_rows=2)
    before = variable.numpy()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"momentum of variable 0 must be float32 with "
                             r"12 elements \(2 packed rows of 6\)"):
        kernels.fused_apply([variable], table, [0], [tf.ones([2, 3])],
                            use_decay=[False], **scalars)
    np.testing.assert_array_equal(variable.numpy(), before)


def test_keras_fit_with_packed_slots(tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras  # pylint: disable=import-outside-toplevel
    import tf_adamw.keras  # pylint: disable=import-outside-toplevel,redefined-outer-name

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = x.sum(axis=1, keepdims=True)
    weights, losses = {}, {}
    for layout in ("separate", "packed"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)),
                                  keras.layers.Dense(3), keras.layers.Dense(1)])
        model.compile(optimizer=tf_adamw.keras.AdamW(
            0.01, use_ema=True, slot_layout=layout), loss="mse",
            jit_compile=False)
        losses[layout] = model.fit(x, y, epochs=2, batch_size=8,
                                   verbose=0).history["loss"]
        weights[layout] = [w.numpy() for w in model.weights]
    assert losses["packed"] == losses["separate"]
    for a, b in zip(weights["packed"], weights["separate"]):
        np.testing.assert_array_equal(a, b)
    assert model.optimizer.get_config()["slot_layout"] == "packed"
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ema_helpers_under_a_strategy_write_every_copy(mirrored_strategy):
    with mirrored_strategy.scope():
        variables = _variables()
        optimizer = tf_adamw.AdamW(slot_layout="packed", use_ema=True,
                                   ema_momentum=0.5)
        optimizer.build(variables)

    def replica_step(grads):
        optimizer.apply_gradients(zip(grads, variables))

    @tf.function
    def step(grads):
        mirrored_strategy.run(replica_step, args=(grads,))

    for i in range(2):
        step([mirrored_strategy.experimental_distribute_values_from_function(
            lambda _, g=g: tf.constant(g)) for g in _grads(i)])
    average = optimizer.moving_averages()[0]
    copies = [c.numpy() for c in average.copies()]
    assert len(copies) == mirrored_strategy.num_replicas_in_sync
    with tf_adamw.ema_weights(optimizer):
        for copy in mirrored_strategy.experimental_local_results(
                variables[0]):
            np.testing.assert_array_equal(copy.numpy(), copies[0])
    average.assign(np.full(SHAPES[0], 3.0, np.float32))
    optimizer.finalize_variable_values(variables)
    for copy in mirrored_strategy.experimental_local_results(variables[0]):
        np.testing.assert_array_equal(copy.numpy(), 3.0)
