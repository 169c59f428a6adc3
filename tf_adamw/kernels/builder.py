"""Builds the fused AdamW CPU kernel (`tf_adamw/cc/fused_adamw.cc`).

The kernel is a TensorFlow custom op compiled on this machine against the
installed TensorFlow's headers (`tf.sysconfig`), the public way to extend TF
with C++. It is built once per (source, TensorFlow build, CPU) and cached:

- in `$TF_ADAMW_KERNEL_DIR` if set, else
- in the package's own `_kernels/` directory when it is writable (an
  editable install: `make venv` builds it there), else
- in `$XDG_CACHE_HOME/tf_adamw` (default `~/.cache/tf_adamw`), else
- in the system's temporary directory.

This module is the build system only: it holds no process-wide state, and
loading the library is `tf_adamw.kernels.loader`'s job.
"""

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import tensorflow as tf

# The `tf_adamw` package directory: the source and the prebuilt cache sit
# there, where `make venv` and earlier releases put them.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(_PACKAGE_ROOT, "cc", "fused_adamw.cc")
_PACKAGE_DIR = os.path.join(_PACKAGE_ROOT, "_kernels")
# -ffp-contract=off: no fused multiply-adds, so the kernel rounds like the
# reference math. -fno-math-errno lets sqrt vectorise (it only drops the errno
# write for negative inputs, which cannot occur). -march=native: the library
# is built on the machine that runs it (the CPU is part of the cache key).
_OPTIMIZE = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
_NATIVE = ["-march=native"]


class KernelBuildError(RuntimeError):
    """The fused kernel could not be compiled; the message has the output."""


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature():
    """What the compiler's -march=native depends on."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _key():
    with open(SOURCE, "rb") as f:
        source = f.read()
    parts = [source, tf.__version__.encode(), tf.sysconfig.get_include()
             .encode(), " ".join(tf.sysconfig.get_compile_flags() +
                                 tf.sysconfig.get_link_flags()).encode(),
             " ".join(_OPTIMIZE).encode(), _cpu_signature().encode(),
             sys.version.encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return f"fused_adamw_tf{tf.__version__}_{digest}.so"


def _writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def _directory():
    configured = os.environ.get("TF_ADAMW_KERNEL_DIR")
    if configured:
        return configured
    for directory in (
            _PACKAGE_DIR,
            os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(
                os.path.expanduser("~"), ".cache"), "tf_adamw"),
            os.path.join(tempfile.gettempdir(), "tf_adamw_kernels")):
        if _writable(directory):
            return directory
    return _PACKAGE_DIR


def library_path(directory=None):
    """Where the library for this source, TensorFlow and CPU lives."""
    return os.path.join(directory or _directory(), _key())


def _compile(compiler, output, arch_flags):
    command = ([compiler, "-shared", "-fPIC", "-w"] + _OPTIMIZE + arch_flags +
               [SOURCE, "-o", output] + tf.sysconfig.get_compile_flags() +
               tf.sysconfig.get_link_flags())
    result = subprocess.run(command, capture_output=True, text=True,
                            check=False)
    return result.returncode == 0, " ".join(command), result.stderr


def build(directory=None, force=False):
    """Compiles the kernel (unless an up-to-date build exists).

    Concurrent builds (several processes starting at once) are serialised
    with a lock file; the library appears atomically.

    Args:
        directory: where to put it (default: see the module docstring).
        force: rebuild even if the library exists.

    Returns:
        The library's path.

    Raises:
        KernelBuildError: no C++ compiler, or the compiler failed.
    """
    directory = directory or _directory()
    os.makedirs(directory, exist_ok=True)
    path = library_path(directory)
    if os.path.exists(path) and not force:
        return path
    compiler = _compiler()
    if compiler is None:
        raise KernelBuildError(
            "no C++ compiler found (tried $CXX, g++, c++, clang++)")
    with open(path + ".lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path) and not force:
            return path
        fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=directory)
        os.close(fd)
        try:
            ok, command, output = _compile(compiler, partial, _NATIVE)
            if not ok:
                # A compiler that does not know -march=native.
                ok, command, output = _compile(compiler, partial, [])
            if not ok:
                raise KernelBuildError(
                    f"compiling the fused AdamW kernel failed:\n{command}\n"
                    + output[-4000:])
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return path
