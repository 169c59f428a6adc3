"""The fused CPU kernel (`tf_adamw/kernels/`, `tf_adamw/cc/fused_adamw.cc`).

- It is what `AdamW` runs by default on CPU, eagerly and in `tf.function`,
  and its step graph holds the one fused op.
- It rounds exactly like the same pipeline written with TF ops (`fused=False,
  jit_compile=False`), bit for bit: float32/bfloat16/float16 variables,
  AMSGrad, excluded variables, sparse gradients, a variable large enough to
  be split across threads, with the EMA, the global clip, gradient
  accumulation and the guard. It agrees with the XLA step to rounding.
- Those stages add no op per variable and no conditional to its step.
- Inside a `jit_compile=True` function the XLA step runs instead.
- It reaches the slots through the optimizer's slot table: a step function
  captures no slot handle, later assignments to slots are seen, variables
  without gradients keep their slots, steps in a `tf.while_loop` equal
  steps one by one, and `slots_for` warns where its reads would not be
  ordered with the kernel.
- It never writes through a buffer a reader still holds (copy-on-write).
- Bad inputs to the ops (accumulation flags included), a failing compiler and an unavailable kernel give
  clear errors or a clean fallback.
"""

import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tf_adamw import AdamW
from tf_adamw import kernels

SHAPES = [(37, 23), (23,), (5,), (600, 600)]  # the last one is threaded


def _initial():
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _grads(step, sparse):
    rng = np.random.default_rng(100 + step)
    grads = [tf.constant(rng.normal(size=s).astype(np.float32))
             for s in SHAPES]
    if sparse:
        # Duplicate indices: the dense equivalent sums them.
        indices = tf.constant([0, 3, 3, 36])
        values = tf.constant(rng.normal(size=(4, 23)).astype(np.float32))
        grads[0] = tf.IndexedSlices(values, indices,
                                    dense_shape=tf.constant(SHAPES[0]))
    return grads


def _train(mode, dtype="float32", steps=4, sparse=False, **kwargs):
    """Runs `steps` steps; returns (optimizer, every variable and slot)."""
    values = _initial()
    variables = [tf.Variable(tf.cast(v, dtype)) for v in values]
    opt = AdamW(learning_rate=0.01, weight_decay=0.1, **kwargs)
    opt.exclude_from_weight_decay(var_list=[variables[1]])

    def step(grads):
        opt.apply_gradients(zip(grads, variables))

    if mode == "function":
        step = tf.function(step)
    elif mode == "jit":
        step = tf.function(step, jit_compile=True)
    for i in range(steps):
        step(_grads(i, sparse))
    return opt, _state(opt, variables)


def _state(opt, variables):
    """Every variable's value, then its slots' values, as arrays."""
    state = [v.numpy() for v in variables]
    for v in variables:
        state += [s.numpy() for _, s in sorted(opt.slots_for(v).items())]
    return state


def _assert_identical(got, want, what):
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and np.array_equal(a, b), (
            f"{what}: array {k} differs in "
            f"{int(np.sum(a != b))} of {a.size} elements")


def test_kernel_is_the_default_on_cpu():
    opt, _ = _train("eager", steps=1)
    assert opt.uses_fused_kernel
    assert os.path.exists(kernels.library_path())


def _traced_step(**kwargs):
    """(variables, optimizer, the concrete `tf.function` of one step)."""
    variables = [tf.Variable(tf.zeros(s)) for s in SHAPES]
    opt = AdamW(**kwargs)
    opt.build(variables)

    @tf.function
    def step(grads):
        opt.apply(grads, variables)

    return variables, opt, step.get_concrete_function(
        [tf.TensorSpec(s, tf.float32) for s in SHAPES])


def test_step_graph_holds_one_fused_op():
    graph = _traced_step()[2].graph
    # Traced into the caller's graph, not a nested function.
    ops = [op.type for op in graph.get_operations()]
    assert ops.count("TfAdamwFusedApply") == 1, ops
    # No per-variable update ops around it, no function call.
    assert "AssignVariableOp" not in ops, ops
    assert "StatefulPartitionedCall" not in ops, ops


# The stages the kernel takes over from per-variable ops: the global
# clip's factor and the EMA (with the periodic overwrite after it), and
# gradient accumulation.
EMA_AND_CLIP = dict(use_ema=True, ema_momentum=0.9, global_clipnorm=1.0,
                    ema_overwrite_frequency=3)
ACCUMULATION = dict(gradient_accumulation_steps=2)
# Everything at once: 7 calls are 3 updates (the third overwrites the
# variables with their averages) and one call that only adds.
EVERY_STAGE = dict(EMA_AND_CLIP, gradient_accumulation_steps=2,
                   skip_nonfinite_gradients=True)
# (options, calls) of each row of the bit-identity matrix.
STAGES = {"bare": ({}, 4), "ema_and_clip": (EMA_AND_CLIP, 4),
          "accumulation": (ACCUMULATION, 5), "every_stage": (EVERY_STAGE, 7)}


def _step_op_types(n, **kwargs):
    """The op types of a traced step on `n` variables of shape [3, 2]."""
    variables = [tf.Variable(tf.zeros([3, 2])) for _ in range(n)]
    opt = AdamW(**kwargs)
    opt.build(variables)
    graph = tf.function(lambda grads: opt.apply(grads, variables)
                        ).get_concrete_function(
        [tf.TensorSpec([3, 2], tf.float32)] * n).graph
    return [op.type for op in graph.get_operations()]


@pytest.mark.parametrize("accumulation", [None, 4])
def test_ema_clip_guard_and_accumulation_add_no_op_per_variable(
        accumulation):
    """With the EMA, the global clip, the non-finite guard and gradient
    accumulation (issue #13): no update op per variable and no conditional
    around the kernel; what is left per variable is the placeholders of
    its gradient and its handle (the sum of squares flattens every
    gradient with one `TfAdamwFlatConcat`)."""
    stages = dict(use_ema=True, global_clipnorm=1.0,
                  skip_nonfinite_gradients=True,
                  gradient_accumulation_steps=accumulation)
    few, many = _step_op_types(20, **stages), _step_op_types(50, **stages)
    assert many.count("TfAdamwFusedApply") == 1, many
    assert "If" not in many and "StatelessIf" not in many, many
    per_variable = {op: many.count(op) - few.count(op) for op in set(many)}
    assert {op: d for op, d in per_variable.items() if d} == {
        "Placeholder": 60}, per_variable
    assert many.count("TfAdamwFlatConcat") == 1, many


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("stages", list(STAGES))
@pytest.mark.parametrize("dtype,amsgrad,sparse", [
    ("float32", False, False),
    ("float32", True, True),
    ("bfloat16", False, True),
    ("float16", True, False),
])
def test_fused_equals_tf_ops_bit_for_bit(mode, stages, dtype, amsgrad,
                                         sparse):
    """The kernel is the pipeline's own arithmetic, rounded identically."""
    stages, steps = STAGES[stages]
    fused_opt, fused = _train(mode, dtype, steps=steps, sparse=sparse,
                              amsgrad=amsgrad, **stages)
    ops_opt, ops = _train(mode, dtype, steps=steps, sparse=sparse,
                          amsgrad=amsgrad, fused=False, jit_compile=False,
                          **stages)
    assert fused_opt.uses_fused_kernel and not ops_opt.uses_fused_kernel
    _assert_identical(fused, ops, f"{mode} {dtype} amsgrad={amsgrad}")


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_variables_in_several_ops_equal_tf_ops_bit_for_bit(mode,
                                                            monkeypatch):
    """Past `VARIABLES_PER_OP` variables the step is several fused ops (and
    several pieces of the accumulated means): the same values."""
    monkeypatch.setattr(kernels.ops, "VARIABLES_PER_OP", 3)
    fused_opt, fused = _train(mode, steps=7, **EVERY_STAGE)
    _, ops = _train(mode, steps=7, fused=False, jit_compile=False,
                    **EVERY_STAGE)
    assert fused_opt.uses_fused_kernel
    _assert_identical(fused, ops, f"{mode}, ops of 3 variables")


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_accumulation_with_a_gradient_missing_equals_tf_ops(mode):
    """A variable without a gradient on the applying call gets no update
    and its stored sum is discarded (docs/semantics.md, step 4), as in the
    plain-ops step, bit for bit."""
    def run(**kwargs):
        variables = [tf.Variable(v) for v in _initial()]
        opt = AdamW(learning_rate=0.01, weight_decay=0.1, use_ema=True,
                    global_clipnorm=1.0, gradient_accumulation_steps=2,
                    **kwargs)

        def step(grads):
            opt.apply_gradients(zip(grads, variables))

        if mode == "function":
            step = tf.function(step)
        for call in range(5):
            grads = _grads(call, sparse=False)
            if call in (1, 2):  # missing on an applying call, then an add
                grads[2] = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the dropped gradient's
                step(grads)
        return opt, _state(opt, variables)

    fused_opt, fused = run()
    _, ops = run(fused=False, jit_compile=False)
    assert fused_opt.uses_fused_kernel
    _assert_identical(fused, ops, mode)


def test_a_bad_input_in_a_later_op_writes_nothing(monkeypatch):
    """Each op checks before it writes, and the later ops are checked
    before the first writes: a bad gradient of the last variable leaves
    the first one as it was."""
    monkeypatch.setattr(kernels.ops, "VARIABLES_PER_OP", 1)
    slots = [tf.Variable(tf.zeros([2])) for _ in range(4)]
    table = kernels.slot_table(slots[:2], slots[2:], [])
    variables = [tf.Variable([1.0, 2.0]), tf.Variable([3.0, 4.0])]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="gradient 1 has 3 elements"):
        kernels.fused_apply(variables, table, [0, 1],
                            [tf.ones([2]), tf.ones([3])], alpha=0.1,
                            one_minus_beta_1=0.1, one_minus_beta_2=0.001,
                            epsilon=1e-7, decay=0.0, use_decay=[True, True])
    np.testing.assert_array_equal(variables[0].numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(slots[0].numpy(), [0.0, 0.0])


def test_a_step_function_captures_one_slot_table_not_the_slots():
    """The kernel reaches the slots through the optimizer's table: a
    function running the step has one input for all slots."""
    variables, opt, step = _traced_step(amsgrad=True)
    captured = step.captured_inputs
    captured_ids = {id(t) for t in captured}
    slots = [s for v in variables for s in opt.slots_for(v).values()]
    assert len(slots) == 3 * len(variables)
    assert not captured_ids & {id(s.handle) for s in slots}
    assert {id(v.handle) for v in variables} <= captured_ids
    # The variables, the table, iterations and five hyperparameters.
    assert len(captured) == len(variables) + 7, captured


def test_steps_in_a_while_loop_equal_steps_one_by_one():
    """The trainer runs many steps in one `tf.while_loop`: each iteration's
    kernel must see the slots (through the table) and variables the
    previous one wrote, bit for bit as separate eager steps do."""
    steps = 20

    def run(in_loop):
        variables = [tf.Variable(v) for v in _initial()]
        opt = AdamW(learning_rate=0.01, amsgrad=True)
        opt.build(variables)

        def one_step():
            with tf.GradientTape() as tape:
                loss = tf.add_n([tf.reduce_sum(tf.sin(v) * v)
                                 for v in variables])
            opt.apply_gradients(zip(tape.gradient(loss, variables),
                                    variables))

        def body(i):
            one_step()
            return [i + 1]

        if in_loop:
            tf.function(lambda: tf.while_loop(
                lambda i: i < steps, body, [tf.constant(0)]),
                autograph=False)()
        else:
            for _ in range(steps):
                one_step()
        assert int(opt.iterations.numpy()) == steps
        return _state(opt, variables)

    _assert_identical(run(in_loop=True), run(in_loop=False), "while_loop")


def test_slots_for_inside_a_fused_step_function_warns():
    """Such reads are not ordered with the kernel (it uses the table)."""
    variable = tf.Variable([1.0, 2.0])
    opt = AdamW()
    opt.build([variable])

    @tf.function
    def step():
        momentum = opt.slots_for(variable)["momentum"]
        opt.apply([tf.ones([2])], [variable])
        return momentum.read_value()

    with pytest.warns(UserWarning, match="not ordered with the step"):
        step()
    xla_opt = AdamW(fused=False)
    xla_opt.build([variable])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf.function(lambda: xla_opt.slots_for(variable)["momentum"] + 1)()
        opt.slots_for(variable)  # eager


def _step_after_assigning_slots(mode, **kwargs):
    """One step, new values assigned to every slot, one more step."""
    variables = [tf.Variable(v) for v in _initial()]
    opt = AdamW(learning_rate=0.01, amsgrad=True, **kwargs)

    def step(grads):
        opt.apply_gradients(zip(grads, variables))

    if mode == "function":
        step = tf.function(step)
    step(_grads(0, False))
    rng = np.random.default_rng(7)
    for v in variables:
        for slot in opt.slots_for(v).values():
            slot.assign(rng.uniform(0.0, 1.0, slot.shape).astype(np.float32))
    step(_grads(1, False))
    return _state(opt, variables)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_the_kernel_sees_slot_values_assigned_after_build(mode):
    """As after a checkpoint restore into a built optimizer: the table
    holds the slot variables themselves, not their buffers."""
    _assert_identical(
        _step_after_assigning_slots(mode),
        _step_after_assigning_slots(mode, fused=False, jit_compile=False),
        mode)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_variables_without_gradients_keep_their_slots(mode):
    def run(**kwargs):
        variables = [tf.Variable(v) for v in _initial()]
        opt = AdamW(learning_rate=0.01, **kwargs)

        def step(grads):
            opt.apply_gradients(zip(grads, variables))

        if mode == "function":
            step = tf.function(step)
        with pytest.warns(UserWarning, match="Gradients do not exist"):
            for i in range(2):
                grads = _grads(i, False)
                step([grads[0], None, grads[2], None])
        return opt, variables, _state(opt, variables)

    fused_opt, variables, fused = run()
    assert fused_opt.uses_fused_kernel
    _, _, ops = run(fused=False, jit_compile=False)
    _assert_identical(fused, ops, mode)
    for i in (1, 3):
        np.testing.assert_array_equal(variables[i].numpy(), _initial()[i])
        for slot in fused_opt.slots_for(variables[i]).values():
            assert not np.any(slot.numpy())


def test_fused_matches_xla_to_rounding():
    _, fused = _train("function", amsgrad=True)
    _, xla = _train("function", amsgrad=True, fused=False)
    for a, b in zip(fused, xla):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7)


def test_inside_a_jit_compiled_function_the_xla_step_runs():
    """A custom op cannot be compiled by XLA: the XLA step is used (and
    agrees with the kernel run eagerly)."""
    opt, jitted = _train("jit", amsgrad=True)
    assert opt.uses_fused_kernel  # it would be used outside XLA
    seen = []

    @tf.function(jit_compile=True)
    def inside_xla():
        seen.append(opt.uses_fused_kernel)  # at trace time
        return tf.constant(0)

    inside_xla()
    assert seen == [False]  # the property tells the truth inside XLA
    _, eager = _train("eager", amsgrad=True)
    for a, b in zip(jitted, eager):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7)


def test_a_value_read_before_the_step_is_not_overwritten():
    """Copy-on-write: a tensor read from the variable (or a slot) before
    the step keeps its value; the kernel writes a fresh buffer instead."""
    variable = tf.Variable([1.0, 2.0, 3.0])
    opt = AdamW(learning_rate=0.1)
    opt.apply([tf.constant([1.0, 1.0, 1.0])], [variable])
    before = variable.read_value()
    momentum = opt.slots_for(variable)["momentum"].read_value()
    snapshot = (before.numpy().copy(), momentum.numpy().copy())
    opt.apply([tf.constant([1.0, 1.0, 1.0])], [variable])
    assert not np.array_equal(variable.numpy(), snapshot[0])
    np.testing.assert_array_equal(before.numpy(), snapshot[0])
    np.testing.assert_array_equal(momentum.numpy(), snapshot[1])


@pytest.mark.parametrize("variable,grad,slot_index,slot_size,message", [
    (tf.zeros([4]), tf.zeros([3]), 0, 4,
     "gradient 0 has 3 elements; its variable has 4"),
    (tf.zeros([2], tf.float64), tf.zeros([2]), 0, 2,
     "variable 0 has dtype double"),
    (tf.zeros([2]), tf.zeros([2]), 1, 2,
     "slot index 1 of variable 0 is outside the slot table of 1 variables"),
    (tf.zeros([2]), tf.zeros([2]), 0, 3,
     "momentum of variable 0 must be float32 with 2 elements; it is float "
     "with 3"),
])
def test_op_rejects_bad_inputs_with_a_clear_message(
        variable, grad, slot_index, slot_size, message):
    """Called directly (the optimizer never passes these)."""
    slots = [tf.Variable(tf.zeros([slot_size])) for _ in range(2)]
    table = kernels.slot_table(slots[:1], slots[1:], [])
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        kernels.fused_apply([tf.Variable(variable)], table, [slot_index],
                            [grad], alpha=0.1, one_minus_beta_1=0.1,
                            one_minus_beta_2=0.001, epsilon=1e-7, decay=0.0,
                            use_decay=[True])


def _kernel_args(accumulators):
    """(variable, table, keyword arguments) for a direct call of the op."""
    slots = [tf.Variable(tf.zeros([2])) for _ in range(3)]
    table = kernels.slot_table(slots[:1], slots[1:2], [],
                               accumulators=slots[2:] if accumulators else [])
    return tf.Variable([1.0, 2.0]), table, dict(
        alpha=0.1, one_minus_beta_1=0.1, one_minus_beta_2=0.001,
        epsilon=1e-7, decay=0.0, use_decay=[True])


@pytest.mark.parametrize("accumulators,flags,message", [
    (False, dict(accumulate=True, apply=False),
     "accumulate is true, but the slot table holds no accumulators"),
    (True, dict(accumulate=True, apply=False),  # accumulation_steps 0
     "holds no accumulators or accumulation_steps is 0"),
    (True, dict(accumulate=True, accumulation_steps=2.0),
     "apply and accumulate are both true"),
    (True, dict(accumulation_steps=-1.0),
     "accumulation_steps must be at least 1 or 0; it is -1"),
    (True, dict(accumulation_steps=float("nan")),
     "accumulation_steps must be at least 1 or 0; it is nan"),
])
def test_op_rejects_bad_accumulation_flags(accumulators, flags, message):
    """Called directly (the optimizer never passes these); nothing is
    written."""
    variable, table, args = _kernel_args(accumulators)
    flags = {k: tf.constant(v) for k, v in flags.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        kernels.fused_apply([variable], table, [0], [tf.ones([2])], **args,
                            **flags)
    np.testing.assert_array_equal(variable.numpy(), [1.0, 2.0])


def test_accumulated_means_are_the_mean_gradients_or_empty():
    variable, table, args = _kernel_args(accumulators=True)
    for _ in range(2):  # accumulator = 2 * [1, 3]
        kernels.fused_apply([variable], table, [0], [tf.constant([1.0, 3.0])],
                            **args, apply=tf.constant(False),
                            accumulate=tf.constant(True),
                            accumulation_steps=tf.constant(4.0))
    np.testing.assert_array_equal(variable.numpy(), [1.0, 2.0])
    means = kernels.accumulated_means(table, [0], [tf.constant([2.0, 2.0])],
                                      tf.constant(4.0), tf.constant(True))
    np.testing.assert_array_equal(means.numpy(), [1.0, 2.0])
    empty = kernels.accumulated_means(table, [0], [tf.constant([2.0, 2.0])],
                                      tf.constant(4.0), tf.constant(False))
    assert empty.shape == (0,)
    _, plain, _ = _kernel_args(accumulators=False)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="the slot table holds no accumulators"):
        kernels.accumulated_means(plain, [0], [tf.ones([2])],
                                  tf.constant(4.0), tf.constant(True))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="accumulation_steps must be at least 1; it is 0"):
        kernels.accumulated_means(table, [0], [tf.ones([2])],
                                  tf.constant(0.0), tf.constant(True))


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32",
                                   "float64"])
def test_flat_concat_is_the_concatenation_of_reshapes_bit_for_bit(mode,
                                                                   dtype):
    """The sum of squares' flattening beside the kernel: the same bits as
    TF's reshapes and concat, scalars and empty tensors included, and
    past the size the op splits across threads; so the global norm rounds
    as in the plain-ops step."""
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (), (0, 3), (5,), (2, 1, 3), (700, 500), (7,)]
    values = [tf.cast(rng.normal(size=s) * 1e3, dtype) for s in shapes]
    flat = (kernels.flat_concat if mode == "eager"
            else tf.function(kernels.flat_concat))(values)
    expected = tf.concat([tf.reshape(v, [-1]) for v in values], 0)
    assert flat.dtype == expected.dtype and flat.shape == expected.shape
    bits = {2: tf.uint16, 4: tf.uint32, 8: tf.uint64}[flat.dtype.size]
    np.testing.assert_array_equal(tf.bitcast(flat, bits).numpy(),
                                  tf.bitcast(expected, bits).numpy())
    # Its static shape is known when every input's element count is.
    traced = tf.function(kernels.flat_concat).get_concrete_function(
        [tf.TensorSpec([3, 4]), tf.TensorSpec([None, 2])])
    assert traced.output_shapes.as_list() == [None]
    traced = tf.function(kernels.flat_concat).get_concrete_function(
        [tf.TensorSpec([3, 4]), tf.TensorSpec([0, None])])
    assert traced.output_shapes.as_list() == [12]


def test_float64_variables_take_the_xla_step():
    variable = tf.Variable([1.0, 2.0], dtype=tf.float64)
    opt = AdamW()
    opt.apply([tf.constant([0.5, 0.5], tf.float64)], [variable])
    assert not opt.uses_fused_kernel
    assert int(opt.iterations.numpy()) == 1


def test_fused_true_refuses_variables_the_kernel_cannot_run():
    opt = AdamW(fused=True)
    with pytest.raises(ValueError, match=r"`fused=True`.*float64"):
        opt.build([tf.Variable([1.0], dtype=tf.float64)])


def test_fused_must_be_none_or_bool():
    with pytest.raises(TypeError, match=r"`fused`.*fused='yes'"):
        AdamW(fused="yes")


def test_unavailable_kernel_falls_back_to_xla(monkeypatch):
    monkeypatch.setattr(kernels, "load", lambda: None)
    monkeypatch.setattr(kernels, "unavailable_reason",
                        lambda: "KernelBuildError: no C++ compiler found")
    variable = tf.Variable([1.0, 2.0])
    opt = AdamW()
    opt.apply([tf.constant([0.5, 0.5])], [variable])
    assert not opt.uses_fused_kernel
    with pytest.raises(ValueError, match="no C\\+\\+ compiler found"):
        AdamW(fused=True).build([tf.Variable([1.0])])


def test_build_is_cached_and_reports_compiler_failures(tmp_path,
                                                        monkeypatch):
    path = kernels.library_path()
    stamp = os.stat(path).st_mtime_ns
    assert kernels.build() == path  # up to date: not rebuilt
    assert os.stat(path).st_mtime_ns == stamp
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(kernels.KernelBuildError,
                       match="compiling the fused AdamW kernel failed"):
        kernels.build(directory=str(tmp_path), force=True)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".so")]
