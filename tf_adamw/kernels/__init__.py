"""Builds and loads the fused AdamW CPU kernel (`tf_adamw/cc/fused_adamw.cc`).

Three layers, so that the native build is cached apart from its use:

- `builder`: compiles the TensorFlow custom op against the installed
  TensorFlow and caches it per (source, TensorFlow build, CPU), in a
  directory only this user can write to, with a checksum that `load()`
  verifies; see its docstring. No process state.
- `loader`: loads the library once per process; `load()` returns None (and
  logs why, once) when it cannot be built here, and `tf_adamw.AdamW` keeps
  its XLA step.
- `ops`: the op wrappers the optimizer calls.

`python -m tf_adamw.kernels` builds it ahead of time and prints its path.

Public API:
    load, unavailable_reason: the process's loaded kernel, or why not.
    slot_table, fused_apply, accumulated_means: the ops.
    build, library_path, KernelBuildError, SOURCE: the build and its cache.
"""

from tf_adamw.kernels.builder import (
    SOURCE,
    KernelBuildError,
    build,
    library_path,
)
from tf_adamw.kernels.loader import load, unavailable_reason
from tf_adamw.kernels.ops import (
    accumulated_means,
    flat_concat,
    fused_apply,
    slot_table,
)

__all__ = [
    "SOURCE",
    "KernelBuildError",
    "accumulated_means",
    "build",
    "flat_concat",
    "fused_apply",
    "library_path",
    "load",
    "slot_table",
    "unavailable_reason",
]
