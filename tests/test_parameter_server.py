"""ParameterServerStrategy is refused at `build()` with a clear error, in
both slot layouts.

A real in-process cluster (one worker and one parameter server on
127.0.0.1) runs in a subprocess: connecting to a cluster changes the eager
context of the whole process, which must not leak into other tests.
"""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.multiprocess

SCRIPT = textwrap.dedent("""
    import os, socket
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    import tf_adamw

    def port():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        return p

    spec = tf.train.ClusterSpec({
        "worker": [f"127.0.0.1:{port()}"], "ps": [f"127.0.0.1:{port()}"],
        "chief": [f"127.0.0.1:{port()}"]})
    servers = [tf.distribute.Server(spec, job_name=job, task_index=0,
                                    protocol="grpc", start=True)
               for job in ("worker", "ps")]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type="chief", task_id=0, rpc_layer="grpc")
    strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
    with strategy.scope():
        v = tf.Variable([1.0])
        for layout in ("separate", "packed"):
            optimizer = tf_adamw.AdamW(slot_layout=layout)
            try:
                optimizer.build([v])
            except ValueError as e:
                print(f"REFUSED {layout}:", e)
            else:
                print(f"BUILT {layout}")
""")


def test_parameter_server_strategy_is_refused_at_build():
    result = subprocess.run([sys.executable, "-c", SCRIPT],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for layout in ("separate", "packed"):
        assert f"REFUSED {layout}:" in result.stdout, (
            result.stdout + result.stderr[-3000:])
    assert "ParameterServerStrategy" in result.stdout
    assert "MirroredStrategy" in result.stdout  # says what to use instead
