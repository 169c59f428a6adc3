"""tf_adamw.engine: the optimizer's untracked half.

Eager calls on one optimizer from several threads take turns: a step reads
`iterations` for its bias correction before it increments it, so two
interleaved steps would use the same step number. With the same gradient in
every call, any order of the calls gives the same result, so N threads of
calls must end bit-identical to the same calls one after another.
"""

import threading

import numpy as np
import pytest
import tensorflow as tf

import tf_adamw

CALLS = 24


def _run(threads, strategy, **kwargs):
    with strategy.scope():
        v = tf.Variable(np.linspace(-1, 1, 2000).astype(np.float32))
        opt = tf_adamw.AdamW(learning_rate=0.01, **kwargs)
        opt.build([v])
    g = tf.constant(np.linspace(0.5, -0.5, 2000).astype(np.float32))
    errors = []

    def work():
        try:
            for _ in range(CALLS // threads):
                opt.apply_gradients([(g, v)])
        except Exception as e:  # pylint: disable=broad-except
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    return [np.array(c.numpy()) for c in getattr(v, "values", (v,))], opt


@pytest.mark.parametrize("kwargs", [{}, {"fused": False},
                                    {"use_ema": True, "global_clipnorm": 1.0}],
                         ids=["fused", "xla", "fused_with_ema_and_clip"])
@pytest.mark.parametrize("replicas", [1, 4])
def test_eager_calls_from_threads_equal_the_calls_in_sequence(
        kwargs, replicas, mirrored_strategy):
    strategy = (mirrored_strategy if replicas == 4
                else tf.distribute.get_strategy())
    want, _ = _run(1, strategy, **kwargs)
    for _ in range(3):  # interleavings differ from run to run
        got, opt = _run(4, strategy, **kwargs)
        assert int(opt.iterations.numpy()) == CALLS
        for copy in got:
            np.testing.assert_array_equal(copy, want[0])
