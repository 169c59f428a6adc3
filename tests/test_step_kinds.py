"""`tf_adamw.step_kinds`: which step runs, and how.

docs/semantics.md, "Step kinds": the fused kernel where it can run, plain
TF ops while a SavedModel is traced from such an optimizer, XLA everywhere
else and always inside an XLA context.

- `choose` is pure: checked against a truth table written out literally.
- `current_context` reads the facts `choose` needs from TensorFlow: checked
  eagerly, in a `tf.function`, in a `tf.function(jit_compile=True)` and
  while a SavedModel is saved.
- `kernel_blocker` says why the kernel cannot run some variables.
- `StepRunner` creates its functions lazily, one per kind, and runs an
  `INLINE` choice without any.
"""

import itertools
import types

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.saved_model import save_context

from tf_adamw import kernels
from tf_adamw import step_kinds
from tf_adamw.step_kinds import FUNCTION, FUSED, INLINE, OPS, XLA
from tf_adamw.step_kinds import CallContext, Choice

# ---------------------------------------------------------------------------
# choose: the truth table.

# (kernel_ready, only_kernel, eager, in_xla, saving) -> (kind, how), for
# every combination that can occur (`in_xla` is never true eagerly).
TRUTH_TABLE = [
    # The kernel cannot run these variables: the XLA function (or, inside
    # an XLA context, its ops in the caller's compiled function).
    ((False, False, False, False, False), (XLA, FUNCTION)),
    ((False, False, False, False, True), (XLA, FUNCTION)),
    ((False, False, False, True, False), (XLA, INLINE)),
    ((False, False, False, True, True), (XLA, INLINE)),
    ((False, False, True, False, False), (XLA, FUNCTION)),
    ((False, False, True, False, True), (XLA, FUNCTION)),
    ((False, True, False, False, False), (XLA, FUNCTION)),
    ((False, True, False, False, True), (XLA, FUNCTION)),
    ((False, True, False, True, False), (XLA, INLINE)),
    ((False, True, False, True, True), (XLA, INLINE)),
    ((False, True, True, False, False), (XLA, FUNCTION)),
    ((False, True, True, False, True), (XLA, FUNCTION)),
    # Kernel ready, traced inside an XLA context: XLA (no custom op there),
    # its ops straight into the caller's compiled function.
    ((True, False, False, True, False), (XLA, INLINE)),
    ((True, False, False, True, True), (XLA, INLINE)),
    ((True, True, False, True, False), (XLA, INLINE)),
    ((True, True, False, True, True), (XLA, INLINE)),
    # Kernel ready, traced in a plain graph: inline, plain ops when saving.
    ((True, False, False, False, False), (FUSED, INLINE)),
    ((True, False, False, False, True), (OPS, INLINE)),
    ((True, True, False, False, False), (FUSED, INLINE)),
    ((True, True, False, False, True), (OPS, INLINE)),
    # Kernel ready, eager: our function, except a kernel-only fused step.
    ((True, False, True, False, False), (FUSED, FUNCTION)),
    ((True, False, True, False, True), (OPS, FUNCTION)),
    ((True, True, True, False, False), (FUSED, INLINE)),
    ((True, True, True, False, True), (OPS, FUNCTION)),
]

# Eager and in an XLA context at once cannot happen (`current_context`
# never reports it); `choose` still lets the XLA context win.
IMPOSSIBLE_ROWS = [
    ((False, False, True, True, False), (XLA, FUNCTION)),
    ((False, False, True, True, True), (XLA, FUNCTION)),
    ((False, True, True, True, False), (XLA, FUNCTION)),
    ((False, True, True, True, True), (XLA, FUNCTION)),
    ((True, False, True, True, False), (XLA, FUNCTION)),
    ((True, False, True, True, True), (XLA, FUNCTION)),
    ((True, True, True, True, False), (XLA, FUNCTION)),
    ((True, True, True, True, True), (XLA, FUNCTION)),
]


def _row_id(row):
    (ready, only, eager, in_xla, saving), _ = row
    return (f"ready={ready}-only={only}-eager={eager}-xla={in_xla}-"
            f"saving={saving}")


def test_truth_table_covers_every_possible_context():
    """Each of the 24 possible input combinations has exactly one row, and
    the impossible ones (eager and in XLA) the other 8."""
    possible = [c for c in itertools.product((False, True), repeat=5)
                if not (c[2] and c[3])]
    assert sorted(inputs for inputs, _ in TRUTH_TABLE) == sorted(possible)
    impossible = [c for c in itertools.product((False, True), repeat=5)
                  if c[2] and c[3]]
    assert sorted(inputs for inputs, _ in IMPOSSIBLE_ROWS) == sorted(
        impossible)


@pytest.mark.parametrize("row", TRUTH_TABLE + IMPOSSIBLE_ROWS, ids=_row_id)
def test_choose_truth_table(row):
    """docs/semantics.md, "Step kinds": `choose` returns the table's
    `Choice` for each combination of facts."""
    (ready, only, eager, in_xla, saving), expected = row
    context = CallContext(eager=eager, in_xla=in_xla, saving=saving)
    got = step_kinds.choose(ready, only, context)
    assert isinstance(got, Choice)
    assert (got.kind, got.how) == expected


def test_choose_kinds_and_hows_are_the_documented_names():
    """The constants are the step kinds of docs/semantics.md and the two
    ways of running one."""
    assert {FUSED, OPS, XLA} == {"fused", "ops", "xla"}
    assert {INLINE, FUNCTION} == {"inline", "function"}


# ---------------------------------------------------------------------------
# current_context: the facts, read from TensorFlow.


def _traced_context(**function_kwargs):
    """The `CallContext` seen while a fresh `tf.function` is traced."""
    seen = []

    def body():
        seen.append(step_kinds.current_context())
        return tf.constant(0)

    tf.function(body, autograph=False, **function_kwargs)()
    assert len(seen) == 1
    return seen[0]


def test_current_context_eager():
    """Eagerly: eager, not in XLA, not saving."""
    assert step_kinds.current_context() == CallContext(
        eager=True, in_xla=False, saving=False)


def test_current_context_in_a_function():
    """Traced in a plain `tf.function`: a graph, not XLA."""
    assert _traced_context() == CallContext(
        eager=False, in_xla=False, saving=False)


def test_current_context_in_a_jit_compiled_function():
    """Traced in `tf.function(jit_compile=True)`: an XLA context."""
    assert _traced_context(jit_compile=True) == CallContext(
        eager=False, in_xla=True, saving=False)


def test_current_context_in_a_function_called_from_a_jit_function():
    """A plain `tf.function` traced from inside a jit-compiled one is in
    the XLA cluster too (the parents' context counts)."""
    seen = []

    @tf.function(autograph=False)
    def inner():
        seen.append(step_kinds.current_context())
        return tf.constant(1)

    @tf.function(jit_compile=True, autograph=False)
    def outer():
        return inner() + 1

    assert int(outer()) == 2
    assert seen == [CallContext(eager=False, in_xla=True, saving=False)]


def test_current_context_in_a_save_context():
    """Traced inside a SavedModel save context: saving."""
    with save_context.save_context(tf.saved_model.SaveOptions()):
        context = _traced_context()
    assert context == CallContext(eager=False, in_xla=False, saving=True)
    # And outside it again, not.
    assert _traced_context() == CallContext(
        eager=False, in_xla=False, saving=False)


def test_current_context_during_a_real_saved_model_save(tmp_path):
    """`tf.saved_model.save` traces a not-yet-traced function in its save
    context: the step traced there is told it is saving."""
    seen = []
    module = tf.Module()
    module.f = tf.function(
        lambda x: (seen.append(step_kinds.current_context()), x * 2)[1],
        input_signature=[tf.TensorSpec([], tf.float32)], autograph=False)
    tf.saved_model.save(module, str(tmp_path / "saved"))
    assert seen, "save did not trace the function"
    assert set(seen) == {CallContext(eager=False, in_xla=False, saving=True)}


# ---------------------------------------------------------------------------
# kernel_blocker.


def test_kernel_blocker_fused_false():
    """`fused=False` blocks the kernel whatever the variables are."""
    variables = [tf.Variable([1.0], dtype=tf.float64)]
    assert step_kinds.kernel_blocker(False, variables, [tf.float64]) == (
        "`fused=False`")
    variables = [tf.Variable([1.0])]
    assert step_kinds.kernel_blocker(False, variables, [tf.float32]) == (
        "`fused=False`")


@pytest.mark.parametrize("fused", [None, True])
def test_kernel_blocker_names_a_float64_variable(fused):
    """A variable computed in float64 blocks the kernel; the reason names
    the variable and its dtype."""
    variables = [tf.Variable([1.0], name="ok32"),
                 tf.Variable([1.0], dtype=tf.float64, name="wide")]
    blocker = step_kinds.kernel_blocker(fused, variables,
                                        [tf.float32, tf.float64])
    assert blocker is not None
    assert "'wide:0'" in blocker and "float64" in blocker
    assert "ok32" not in blocker


def test_kernel_blocker_names_a_variable_off_cpu():
    """A variable on another device blocks the kernel (CPU only). A
    stand-in object: this machine has no accelerator."""
    on_gpu = types.SimpleNamespace(
        name="gpu_var:0", dtype=tf.float32,
        device="/job:localhost/replica:0/task:0/device:GPU:0")
    blocker = step_kinds.kernel_blocker(None, [on_gpu], [tf.float32])
    assert blocker is not None
    assert "'gpu_var:0'" in blocker and "GPU:0" in blocker
    assert "CPU" in blocker


def _require_kernel():
    if kernels.load() is None:
        pytest.skip("fused kernel unavailable: "
                    f"{kernels.unavailable_reason()}")


@pytest.mark.parametrize("fused", [None, True])
def test_kernel_blocker_none_for_cpu_float32_and_16_bit(fused):
    """Float32, bfloat16 and float16 variables on CPU (16-bit ones are
    computed in float32): nothing blocks the kernel."""
    _require_kernel()
    variables = [tf.Variable([1.0]), tf.Variable([1.0], dtype=tf.bfloat16),
                 tf.Variable([1.0], dtype=tf.float16)]
    assert step_kinds.kernel_blocker(fused, variables,
                                     [tf.float32] * 3) is None


def test_kernel_blocker_none_for_mirrored_cpu_variables(mirrored_strategy):
    """Every replica's copy is on a CPU: nothing blocks the kernel."""
    _require_kernel()
    with mirrored_strategy.scope():
        variable = tf.Variable([1.0, 2.0])
    assert len(variable.values) == 4
    assert step_kinds.kernel_blocker(None, [variable], [tf.float32]) is None


# ---------------------------------------------------------------------------
# StepRunner.


class FakeStep:
    """A step and a scalars function that record how they were called.

    `step(grads, external, fused)` returns `external["lr"] * sum(grads)`
    and records, per call in Python (once per trace), whether it ran
    eagerly, whether in XLA, and `fused`.
    """

    def __init__(self):
        self.calls = []
        self.scalar_calls = []

    def step(self, grads, external, fused):
        context = step_kinds.current_context()
        self.calls.append((context.eager, context.in_xla, fused))
        return external["lr"] * tf.add_n(grads)

    def scalars(self, iterations, external, dtype):
        self.scalar_calls.append(tf.executing_eagerly())
        return {"alpha": tf.cast(iterations, dtype) * tf.cast(
            external["lr"], dtype)}


GRADS = [tf.constant([1.0, 2.0]), tf.constant([3.0, 4.0])]
EXTERNAL = {"lr": tf.constant(0.5)}
EXPECTED = [2.0, 3.0]


def test_runner_inline_calls_the_step_directly():
    """An INLINE choice runs the step here (eagerly when called eagerly)
    and creates no function."""
    fake = FakeStep()
    runner = step_kinds.StepRunner(fake.step, fake.scalars, jit_compile=True)
    for kind in (FUSED, OPS):
        out = runner.run(Choice(kind, INLINE), GRADS, EXTERNAL)
        np.testing.assert_array_equal(out.numpy(), EXPECTED)
    assert runner.functions == {}
    assert fake.calls == [(True, False, True), (True, False, False)]


def test_runner_inline_inside_a_function_traces_into_it():
    """Called from a user's `tf.function`, an INLINE step is traced into
    that graph (not eager, no function of ours)."""
    fake = FakeStep()
    runner = step_kinds.StepRunner(fake.step, fake.scalars, jit_compile=True)
    out = tf.function(lambda g, e: runner.run(Choice(FUSED, INLINE), g, e),
                      autograph=False)(GRADS, EXTERNAL)
    np.testing.assert_array_equal(out.numpy(), EXPECTED)
    assert runner.functions == {}
    assert fake.calls == [(False, False, True)]


def test_runner_makes_one_function_per_kind_lazily():
    """FUNCTION choices create one `tf.function` per kind on first use and
    reuse it: the XLA one compiled by XLA (`jit_compile=True`), FUSED and
    OPS plain, each passing `fused` for its kind."""
    fake = FakeStep()
    runner = step_kinds.StepRunner(fake.step, fake.scalars, jit_compile=True)
    assert runner.functions == {}
    expected_calls = {XLA: (False, True, False), FUSED: (False, False, True),
                      OPS: (False, False, False)}
    made = {}
    for kind in (XLA, FUSED, OPS):
        for _ in range(2):  # the second call reuses the function and trace
            out = runner.run(Choice(kind, FUNCTION), GRADS, EXTERNAL)
            np.testing.assert_array_equal(out.numpy(), EXPECTED)
        made[kind] = runner.functions[kind]
        assert set(runner.functions) == set(made)
        assert fake.calls[-1] == expected_calls[kind]
    assert fake.calls == [expected_calls[k] for k in (XLA, FUSED, OPS)]
    assert len({id(f) for f in made.values()}) == 3
    for function in made.values():
        assert isinstance(function, tf.types.experimental.PolymorphicFunction)


def test_runner_xla_kind_without_jit_compile_is_not_compiled():
    """`jit_compile=False` (debugging): the XLA kind's function is a plain
    `tf.function`."""
    fake = FakeStep()
    runner = step_kinds.StepRunner(fake.step, fake.scalars, jit_compile=False)
    out = runner.run(Choice(XLA, FUNCTION), GRADS, EXTERNAL)
    np.testing.assert_array_equal(out.numpy(), EXPECTED)
    assert list(runner.functions) == [XLA]
    assert fake.calls == [(False, False, False)]


def test_runner_scalars_function_only_when_eager():
    """Eagerly the scalars run as one function of ours (made once);
    traced, they go straight into the caller's graph."""
    fake = FakeStep()
    runner = step_kinds.StepRunner(fake.step, fake.scalars, jit_compile=True)
    iterations = tf.constant(4, tf.int64)
    for _ in range(2):
        out = runner.scalars(iterations, EXTERNAL, tf.float32)
        assert float(out["alpha"]) == 2.0
    assert list(runner.functions) == ["scalars"]
    assert fake.scalar_calls == [False]  # traced once, in our function

    fake = FakeStep()
    runner = step_kinds.StepRunner(fake.step, fake.scalars, jit_compile=True)
    out = tf.function(
        lambda i, e: runner.scalars(i, e, tf.float64)["alpha"],
        autograph=False)(iterations, EXTERNAL)
    assert out.dtype == tf.float64 and float(out) == 2.0
    assert runner.functions == {}
    assert fake.scalar_calls == [False]
