"""Builds the fused AdamW CPU kernel (`tf_adamw/cc/fused_adamw.cc`).

The kernel is a TensorFlow custom op compiled on this machine against the
installed TensorFlow's headers (`tf.sysconfig`), the public way to extend TF
with C++. It is built once per (source, TensorFlow build, CPU) and cached:

- in `$TF_ADAMW_KERNEL_DIR` if set, else
- in the package's own `_kernels/` directory when it is writable (an
  editable install: `make venv` builds it there), else
- in `$XDG_CACHE_HOME/tf_adamw` (default `~/.cache/tf_adamw`), else
- in `tf_adamw_kernels-<uid>` in the system's temporary directory.

Loading a library runs its code, so a cache directory must be this user's
alone: owned by the current user and not writable by its group or by others
(a new one is created 0700; the package's `_kernels/` 0755). Any other
directory is skipped; `$TF_ADAMW_KERNEL_DIR`, an explicit choice, is refused
with `KernelBuildError` instead. A library file must be this user's alone
too.

A build is checked before it is cached: the compiled library is loaded once
in a child process (so a broken one crashes the child, not the caller), and
only then is it renamed into place and its SHA-256 written beside it
(`<library>.sha256`, in `sha256sum`'s format). A library whose checksum file
is missing or does not match (a killed build, a truncated file) is not
loaded but rebuilt (`unverified_reason`).

This module is the build system only: it holds no process-wide state, and
loading the library is `tf_adamw.kernels.loader`'s job.
"""

import fcntl
import hashlib
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

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
# Tried in order. TensorFlow 2.21's bundled Eigen does not compile with
# AVX512-FP16 enabled (PacketMathFP16.h, GCC 12), which -march=native turns
# on for Sapphire Rapids and newer: those CPUs keep AVX-512 without it.
# Last, no -march at all: a compiler that knows none of these.
_ARCH_FLAGS = (["-march=native"], ["-march=native", "-mno-avx512fp16"], [])
# Beside each library: its SHA-256, written once the library has loaded.
_CHECKSUM = ".sha256"
# Importing TensorFlow in the checking child takes seconds; a busy machine
# may take a minute. A hang beyond this is a failed build.
_LOAD_CHECK_SECONDS = 600
_LOAD_CHECK = "import sys, tensorflow as tf; tf.load_op_library(sys.argv[1])"
# Partial files of other builds (another TensorFlow's, or an earlier
# release's tmp*.so.partial) may belong to a build running now, under a lock
# this one does not hold: they are litter only once far older than a build.
_STALE_SECONDS = 3600


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
             " ".join(_OPTIMIZE).encode(), repr(_ARCH_FLAGS).encode(),
             _cpu_signature().encode(),
             sys.version.encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return f"fused_adamw_tf{tf.__version__}_{digest}.so"


def _not_private(info):
    """Why a file or directory (its `os.stat`) is not this user's alone.

    Returns:
        A reason, or None if the current user owns it and neither its group
        nor others can write to it.
    """
    uid = os.geteuid()
    if info.st_uid != uid:
        return f"it is owned by uid {info.st_uid}, not by this user ({uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return ("it is writable by its group or by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o})")
    return None


def _refusal(directory, mode, shared_parent=False):
    """Why `directory` must not hold the kernel (None if it may).

    Creates it (with `mode`, less the umask) if it does not exist.

    Args:
        directory: a cache directory.
        mode: the mode to create it with.
        shared_parent: its parent is writable by others (the temporary
            directory), so a symbolic link there may be anyone's.
    """
    try:
        os.makedirs(directory, mode=mode, exist_ok=True)
        info = os.lstat(directory) if shared_parent else os.stat(directory)
    except OSError as e:
        return f"it cannot be created ({e})"
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link in a directory others can write to"
    return _not_private(info)


def _checked(directory, what):
    """`directory`, created 0700 if missing, or KernelBuildError why not."""
    reason = _refusal(directory, 0o700)
    if reason is not None:
        raise KernelBuildError(
            f"refusing {what} {directory}: {reason}. Loading a library runs "
            "its code, so it must be a directory only this user can write to")
    return directory


def _directory():
    """The first usable cache directory (see the module docstring)."""
    configured = os.environ.get("TF_ADAMW_KERNEL_DIR")
    if configured:
        return _checked(configured, "$TF_ADAMW_KERNEL_DIR")
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    temp = os.path.join(tempfile.gettempdir(),
                        f"tf_adamw_kernels-{os.geteuid()}")
    refused = []
    for directory, mode in ((_PACKAGE_DIR, 0o755),
                            (os.path.join(cache_home, "tf_adamw"), 0o700),
                            (temp, 0o700)):
        reason = _refusal(directory, mode, shared_parent=directory == temp)
        if reason is None and not os.access(directory, os.W_OK | os.X_OK):
            reason = "it is not writable"
        if reason is None:
            return directory
        refused.append(f"{directory}: {reason}")
    raise KernelBuildError(
        "no usable directory for the fused kernel; set $TF_ADAMW_KERNEL_DIR "
        "to a directory only you can write to. Refused:\n"
        + "\n".join(refused))


def library_path(directory=None):
    """Where the library for this source, TensorFlow and CPU lives."""
    return os.path.join(directory or _directory(), _key())


def _sha256(path):
    """The file's SHA-256, hex; read whole: the library is ~0.1-1 MB."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def unverified_reason(path):
    """Why the library at `path` must not be loaded (None if it may).

    Cheap enough for every process's first `load()`: two `stat`s and one
    hash of the library, no child process.

    Args:
        path: a `library_path()`.

    Returns:
        None if the library is this user's alone and matches the checksum
        its build wrote; else why not (not built, a killed or earlier build
        without a checksum, a truncated or altered file, foreign-owned).
    """
    try:
        reason = _not_private(os.stat(path))
        if reason is not None:
            return "the library is not this user's alone: " + reason
        with open(path + _CHECKSUM, encoding="utf-8") as f:
            recorded = f.read().split()[:1]
        if recorded != [_sha256(path)]:
            return "the library does not match its checksum (truncated?)"
    except FileNotFoundError as e:
        if e.filename == path:
            return "the library has not been built yet"
        return "the library has no checksum file (an unfinished build)"
    except OSError as e:
        return f"the library cannot be checked ({e})"
    return None


def _compile(compiler, output, arch_flags):
    command = ([compiler, "-shared", "-fPIC", "-w"] + _OPTIMIZE + arch_flags +
               [SOURCE, "-o", output] + tf.sysconfig.get_compile_flags() +
               tf.sysconfig.get_link_flags())
    result = subprocess.run(command, capture_output=True, text=True,
                            check=False)
    return result.returncode == 0, " ".join(command), result.stderr


def _exit_description(code):
    """A child's return code in words (negative: the signal that killed it)."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _check_loads(library, command):
    """Loads `library` in a child process, or raises KernelBuildError.

    A child, because a truncated or garbage library can crash the process
    that loads it (SIGBUS), and a compiler may exit 0 yet write garbage.

    Args:
        library: the freshly compiled file.
        command: the compiler's command line, for the error message.
    """
    env = dict(os.environ)
    # The same TensorFlow as this process's: it is the one that will load it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        result = subprocess.run(
            [sys.executable, "-c", _LOAD_CHECK, library], env=env,
            capture_output=True, text=True, timeout=_LOAD_CHECK_SECONDS,
            check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(
            f"could not check that the compiled kernel loads: {e}") from e
    if result.returncode != 0:
        raise KernelBuildError(
            "the compiled fused AdamW kernel does not load ("
            f"{_exit_description(result.returncode)} in a child process); "
            f"it was not cached. The compiler ran:\n{command}\n"
            + result.stderr[-4000:])


def _write_checksum(path, digest):
    """Writes `path`'s checksum file atomically: all of it, or none."""
    directory, name = os.path.split(path)
    fd, partial = tempfile.mkstemp(prefix=name + _CHECKSUM + ".",
                                   suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{digest}  {name}\n")  # `sha256sum -c` reads this
        os.chmod(partial, 0o644)
        os.replace(partial, path + _CHECKSUM)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _is_partial(name):
    """A partial file of a build: this module's, or an earlier release's."""
    return name.endswith(".partial") and (
        name.startswith("fused_adamw_")
        or (name.startswith("tmp") and name.endswith(".so.partial")))


def _remove_litter(directory, name):
    """Deletes partial files that killed builds left in `directory`.

    Called under the lock of library `name`: no build of it is running, so
    its partial files are litter. Other partial files go once stale.
    """
    cutoff = time.time() - _STALE_SECONDS
    with os.scandir(directory) as entries:
        for entry in entries:
            if not _is_partial(entry.name):
                continue
            try:
                if (entry.name.startswith(name + ".") or
                        entry.stat(follow_symlinks=False).st_mtime < cutoff):
                    os.remove(entry.path)
            except OSError:
                pass  # best effort: litter must not fail the build


def _build_verified(compiler, path):
    """Compiles, checks and caches the library at `path` (under its lock)."""
    directory, name = os.path.split(path)
    fd, partial = tempfile.mkstemp(prefix=name + ".", suffix=".partial",
                                   dir=directory)
    os.close(fd)
    try:
        for arch_flags in _ARCH_FLAGS:
            ok, command, output = _compile(compiler, partial, arch_flags)
            if ok:
                break
        if not ok:
            raise KernelBuildError(
                f"compiling the fused AdamW kernel failed:\n{command}\n"
                + output[-4000:])
        # The linker applies the umask (002 makes it group-writable, which
        # unverified_reason refuses); the library is code, not secret.
        os.chmod(partial, 0o755)
        _check_loads(partial, command)
        digest = _sha256(partial)
        os.replace(partial, path)
        # Last: a build killed before this line leaves no checksum, so the
        # next load rebuilds instead of trusting it.
        _write_checksum(path, digest)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def build(directory=None, force=False):
    """Compiles the kernel (unless a verified build exists).

    Concurrent builds (several processes starting at once) are serialised
    with a lock file; the library appears atomically, once a child process
    has loaded it, and its checksum after it.

    Args:
        directory: where to put it (default: see the module docstring); it
            must be this user's alone.
        force: rebuild even if a verified library exists.

    Returns:
        The library's path.

    Raises:
        KernelBuildError: no C++ compiler, the compiler failed, its output
            does not load, or the directory is not this user's alone.
    """
    directory = (_checked(directory, "the kernel directory") if directory
                 else _directory())
    path = library_path(directory)
    if not force and unverified_reason(path) is None:
        return path
    compiler = _compiler()
    if compiler is None:
        raise KernelBuildError(
            "no C++ compiler found (tried $CXX, g++, c++, clang++)")
    with open(path + ".lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Another process may have built it while this one waited.
        if not force and unverified_reason(path) is None:
            return path
        _remove_litter(directory, os.path.basename(path))
        _build_verified(compiler, path)
    return path
