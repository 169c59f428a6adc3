"""`tf_adamw.pipeline`: the shape of a traced step of plain TF ops.

The step's arithmetic is checked elsewhere (tests/test_update.py against
NumPy, tests/test_kernels.py bit for bit against the fused kernel,
tests/test_keras_parity.py against Keras, tests/test_distribute.py on 4
replicas). Here: in a graph, the weight decay, Adam, EMA and global-clip
factor of every four variables are one call of a function traced once per
kind of argument list (`pipeline.update_variables`), not ~40 ops per
variable in the step's own graph (issue #13), and under XLA no variable
adds an op that tf2xla translates slowly.
"""

import gc
import weakref

import numpy as np
import pytest
import tensorflow as tf

from tf_adamw import AdamW

SHAPES = [[3, 2], [4], [2, 2, 2]]
STAGES = dict(use_ema=True, global_clipnorm=1.0, amsgrad=True)


def _traced(n, jit_compile, **kwargs):
    """The graph of a step on `n` variables cycling through `SHAPES`,
    traced in the user's `tf.function(jit_compile=jit_compile)`."""
    shapes = [SHAPES[i % len(SHAPES)] for i in range(n)]
    variables = [tf.Variable(tf.ones(s)) for s in shapes]
    opt = AdamW(fused=False, **kwargs)
    opt.build(variables)
    function = tf.function(lambda grads: opt.apply(grads, variables),
                           jit_compile=jit_compile)
    return function.get_concrete_function(
        [tf.TensorSpec(s, tf.float32) for s in shapes]).graph


def _update_functions(graph):
    return [f.signature.name for f in graph.as_graph_def().library.function
            if "update_variables" in f.signature.name]


def test_every_four_variables_are_one_call_in_the_callers_xla_function():
    few, many = _traced(21, True, **STAGES), _traced(51, True, **STAGES)

    def types(graph):
        return [op.type for op in graph.get_operations()]

    per_variable = {op: types(many).count(op) - types(few).count(op)
                    for op in set(types(many))}
    # Placeholders: the gradient and the handles of the variable, m, v,
    # v_hat and the average; Reshape and its Const: the sum of squares.
    # (21 variables: 6 calls, the last of one; 51: 13, the last of three.)
    assert {op: d for op, d in per_variable.items() if d} == {
        "Placeholder": 180, "StatefulPartitionedCall": 7, "Reshape": 30,
        "Const": 30}, per_variable


# Ops that tf2xla (TF 2.21) lowers through an MLIR pipeline built for each
# node, ~4 ms each on the benchmark machine against ~0.05 ms for the others
# (benchmarks/README.md, "Where tf2xla's time went"): none may come once
# per variable.
MLIR_LOWERED = {"Sqrt", "Rsqrt", "Reciprocal", "Exp", "Abs", "Sign", "Floor",
                "IsFinite", "Select"}


def _all_op_types(graph):
    """Op types of `graph` and of every function in its library."""
    gdef = graph.as_graph_def()
    return [node.op for node in gdef.node] + [
        node.op for f in gdef.library.function for node in f.node_def]


@pytest.mark.parametrize("kwargs", [
    STAGES, dict(clipnorm=1.0), dict(clipvalue=0.5),
    dict(use_ema=True, ema_overwrite_frequency=3, global_clipnorm=1.0,
         skip_nonfinite_gradients=True, gradient_accumulation_steps=2)],
    ids=["ema_clip_amsgrad", "clipnorm", "clipvalue", "all"])
def test_no_op_per_variable_that_tf2xla_lowers_through_mlir(kwargs):
    few = _all_op_types(_traced(3, True, **kwargs))
    many = _all_op_types(_traced(9, True, **kwargs))
    grown = {op: many.count(op) - few.count(op) for op in MLIR_LOWERED}
    assert not any(grown.values()), grown
    # The update's square root is there, as the op tf2xla lowers directly.
    assert "_UnaryOpsComposition" in many


def test_update_function_is_traced_per_kind_not_per_variable():
    """`reduce_retracing`: after the first shape, one trace serves every
    shape; the count does not grow with the variables."""
    few, many = _traced(6, True, **STAGES), _traced(60, True, **STAGES)
    assert 1 <= len(_update_functions(many)) <= 2, _update_functions(many)
    assert len(_update_functions(many)) == len(_update_functions(few))


def test_a_plain_function_step_calls_it_too():
    """`fused=False` in a plain `tf.function`: the step is the optimizer's
    own XLA function, which holds the calls."""
    graph = _traced(9, False, **STAGES)
    library = graph.as_graph_def().library.function
    calls = sum(node.op == "StatefulPartitionedCall"
                for f in library for node in f.node_def
                if "update_variables" not in f.signature.name)
    assert calls == 3, [f.signature.name for f in library]


def test_a_new_optimizer_traces_after_the_first_is_gone():
    """A trace remembers the variables it was traced with and refuses to
    run once they are deleted: each traced step has functions of its own,
    so a second optimizer on new variables is not refused. (float64: no
    other test's trace matches, so the test does not depend on their
    order.)"""
    gone = []
    for _ in range(2):
        variables = [tf.Variable(tf.ones(s, tf.float64)) for s in SHAPES]
        gone.append(weakref.ref(variables[0]))
        opt = AdamW(fused=False, **STAGES)

        def step(grads):
            opt.apply_gradients(zip(grads, variables))  # noqa: B023

        tf.function(step, jit_compile=True)(
            [tf.ones(s, tf.float64) for s in SHAPES])
        assert np.all(np.isfinite(variables[0].numpy()))
        del opt, step, variables
        gc.collect()
    # The first optimizer's variables were gone when the second traced.
    assert gone[0]() is None
