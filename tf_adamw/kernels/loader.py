"""Loads the fused AdamW kernel into this process, once.

The first `load()` builds the library if its cache has no verified one (see
`tf_adamw.kernels.builder`) and loads it. If no C++ compiler is found or the
build fails, `load()` returns None, the reason is logged once, and
`tf_adamw.AdamW` keeps its XLA step.
"""

import logging
import os
import threading

import tensorflow as tf

from tf_adamw.kernels import builder

_log = logging.getLogger("tf_adamw")
# The outcome is per process: every optimizer shares one loaded library, and
# a failed build is not retried (nor its warning repeated) on each build().
_lock = threading.Lock()
_state = {"tried": False, "module": None, "reason": None}


def load():
    """The loaded op module, or None if the kernel cannot be built here.

    Thread-safe; the build (or the failure) happens once per process. A
    cached library is loaded only if it passes `builder.unverified_reason`
    (its checksum matches); otherwise it is rebuilt first.
    """
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _state["module"] = tf.load_op_library(_verified_path())
            except (builder.KernelBuildError, OSError,
                    tf.errors.OpError) as e:
                _state["reason"] = f"{type(e).__name__}: {e}"
                _log.warning(
                    "tf_adamw: the fused AdamW kernel is unavailable, using "
                    "the XLA step instead. %s", _state["reason"])
        return _state["module"]


def _verified_path():
    """The library's path, (re)built unless the cached one is verified."""
    path = builder.library_path()
    problem = builder.unverified_reason(path)
    if problem is None:
        return path
    # Said by default (a warning): the build takes ~10-20 s, once per
    # machine and TensorFlow, and a silent pause looks like a hang.
    _log.warning("tf_adamw: compiling the fused AdamW kernel (once per "
                 "machine, ~10-20 s) into %s: %s", path, problem)
    try:
        return builder.build()
    except builder.KernelBuildError as e:
        if os.path.exists(path):
            # Say why the cached library was not used either.
            raise builder.KernelBuildError(
                f"the cached {path} was not loaded ({problem}) and "
                f"rebuilding it failed: {e}") from e
        raise


def unavailable_reason():
    """Why `load()` returned None (None if it has not failed)."""
    load()
    return _state["reason"]
