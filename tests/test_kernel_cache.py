"""The fused kernel's cache loads only libraries it built and checked.

`tf_adamw/kernels/builder.py` and `loader.py`:

- A truncated library (loading it crashes with SIGBUS) is rebuilt, not
  loaded, whether its checksum file is missing or stale.
- A compiler that exits 0 but writes garbage fails the build with a reason;
  nothing is cached, so a later load with a working compiler succeeds. If
  the rebuild of a bad cached library fails, `load()` returns None and says
  why.
- A cache directory that is not the user's alone (another user's, or
  writable by others: the temporary directory's, `~/.cache/tf_adamw`,
  `$TF_ADAMW_KERNEL_DIR`) is refused, and so is a library file that is not:
  a planted library never runs, even with a matching checksum beside it.
- A build deletes the partial files that killed builds left behind.
- -march=native flags that do not compile fall back in order, and the
  real build's update loop is vectorised.
- The cached path starts no process.

Loads run in child processes: a crash there fails the test rather than
killing pytest. Most builds use a stand-in compiler (a script set as $CXX
that copies a real build) to keep the tests fast.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from tf_adamw import kernels
from tf_adamw.kernels import builder

ROOT = pathlib.Path(__file__).resolve().parents[1]
OTHER_UID = 4242  # "another user": no account needed to own a file
# Run in a child: loads the kernel, prints the outcome as JSON. An optional
# argument replaces the package's `_kernels/` directory.
_LOAD = """
import json, sys
from tf_adamw.kernels import builder, loader
if len(sys.argv) > 1:
    builder._PACKAGE_DIR = sys.argv[1]
module = loader.load()
try:
    path = builder.library_path()
except builder.KernelBuildError:
    path = None
print(json.dumps({"loaded": module is not None,
                  "reason": loader.unavailable_reason(), "path": path}))
"""
_PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  const char *marker = getenv("TF_ADAMW_TEST_MARKER");
  FILE *f = marker ? fopen(marker, "w") : NULL;
  if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def good_library(tmp_path_factory):
    """A copy of this machine's real, verified build of the kernel."""
    copy = tmp_path_factory.mktemp("good") / "good.so"
    shutil.copyfile(kernels.build(), copy)
    return copy


@pytest.fixture(scope="module")
def planted_library(tmp_path_factory):
    """A library whose constructor writes $TF_ADAMW_TEST_MARKER."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the planted library")
    directory = tmp_path_factory.mktemp("planted")
    (directory / "planted.c").write_text(_PLANTED_C)
    subprocess.run([compiler, "-shared", "-fPIC", "-o",
                    str(directory / "planted.so"),
                    str(directory / "planted.c")], check=True)
    return directory / "planted.so"


def _script(path, body):
    """An executable shell script standing in for the C++ compiler."""
    path.write_text("#!/bin/sh\n# Finds the -o argument, as g++ takes it.\n"
                    "while [ $# -gt 0 ]; do\n"
                    '  if [ "$1" = -o ]; then out="$2"; fi\n'
                    "  shift\ndone\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def copying_compiler(tmp_path, good_library):
    """A $CXX that "compiles" by copying the good build; logs each run."""
    log = tmp_path / "compiler_runs"
    return _script(tmp_path / "copying_cxx",
                   f'echo run >> "{log}"\ncp "{good_library}" "$out"\n'), log


def _name():
    return os.path.basename(kernels.library_path())


def _sha256(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _private_dir(path):
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def _give_away(*paths):
    """Makes `paths` another user's (only root can)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: files owned by another user are made with "
                    "os.chown")
    for path in paths:
        try:
            os.chown(path, OTHER_UID, OTHER_UID)
        except OSError as e:
            # A sandbox (Bazel's linux-sandbox) maps no other uid.
            pytest.skip(f"cannot give a file to uid {OTHER_UID} here: {e}")


def _env(**updates):
    """The environment of a child: this checkout's package, no $CXX."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_ADAMW_KERNEL_DIR", "CXX")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update({k: str(v) for k, v in updates.items()})
    return env


def _load_in_child(env, package_dir=None):
    """`kernels.load()` in a child process: its outcome, and its stderr."""
    args = [str(package_dir)] if package_dir else []
    result = subprocess.run([sys.executable, "-c", _LOAD] + args, env=env,
                            cwd=ROOT, capture_output=True, text=True,
                            timeout=600, check=False)
    code = result.returncode
    assert code == 0, (
        "the child loading the kernel "
        + (f"was killed by {signal.Signals(-code).name}" if code < 0
           else f"exited with status {code}")
        + ":\n" + result.stderr[-3000:])
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    outcome["stderr"] = result.stderr
    return outcome


def _assert_verified(path, good_library):
    """`path` is the good build, this user's alone, with its checksum."""
    info = os.stat(path)
    assert info.st_uid == os.geteuid()
    assert not info.st_mode & 0o022, oct(info.st_mode)
    assert pathlib.Path(path).read_bytes() == good_library.read_bytes()
    checksum = pathlib.Path(str(path) + ".sha256").read_text()
    assert checksum == f"{_sha256(path)}  {os.path.basename(path)}\n"


@pytest.mark.parametrize("checksum", ["missing", "stale"])
def test_a_truncated_library_is_rebuilt_not_loaded(
        tmp_path, good_library, copying_compiler, checksum):
    """As a full disk or a killed copy leaves it: loading it is a SIGBUS."""
    directory = _private_dir(tmp_path / "kernels")
    path = directory / _name()
    good = good_library.read_bytes()
    path.write_bytes(good[:len(good) // 2])
    if checksum == "stale":  # the checksum of the file before it was cut
        (directory / (path.name + ".sha256")).write_text(
            f"{_sha256(good_library)}  {path.name}\n")
    compiler, runs = copying_compiler
    outcome = _load_in_child(_env(TF_ADAMW_KERNEL_DIR=directory,
                                  CXX=compiler))
    assert outcome["loaded"], outcome["reason"]
    assert runs.read_text() == "run\n"  # rebuilt once
    _assert_verified(path, good_library)


def test_the_first_build_says_it_is_compiling(tmp_path, copying_compiler):
    """A build takes ~10-20 s: the first use says so by default (a logged
    warning on stderr), not silently."""
    compiler, _ = copying_compiler
    outcome = _load_in_child(_env(
        TF_ADAMW_KERNEL_DIR=_private_dir(tmp_path / "kernels"), CXX=compiler))
    assert outcome["loaded"], outcome["reason"]
    assert "compiling the fused AdamW kernel" in outcome["stderr"]
    again = _load_in_child(_env(TF_ADAMW_KERNEL_DIR=tmp_path / "kernels",
                                CXX=compiler))
    assert "compiling" not in again["stderr"]  # cached: nothing to say


@pytest.mark.parametrize("garbage", ["text", "truncated library"])
def test_a_compiler_writing_garbage_fails_the_build(
        tmp_path, monkeypatch, good_library, copying_compiler, garbage):
    """It exits 0: the build must notice, and cache nothing."""
    directory = _private_dir(tmp_path / "kernels")
    body = ('echo "not a shared library" > "$out"\n' if garbage == "text"
            else f'head -c 3000 "{good_library}" > "$out"\n')
    monkeypatch.setenv("CXX", str(_script(tmp_path / "bad_cxx", body)))
    how = "exit status 1" if garbage == "text" else "killed by SIGBUS"
    with pytest.raises(kernels.KernelBuildError,
                       match=f"does not load \\({how} in a child process"):
        kernels.build(directory=str(directory))
    assert sorted(os.listdir(directory)) == [_name() + ".lock"]
    # Nothing was cached, so a working compiler builds it next time.
    compiler, runs = copying_compiler
    outcome = _load_in_child(_env(TF_ADAMW_KERNEL_DIR=directory,
                                  CXX=compiler))
    assert outcome["loaded"], outcome["reason"]
    assert runs.read_text() == "run\n"
    _assert_verified(directory / _name(), good_library)


def test_a_compiler_refusing_the_native_flags_gets_the_next_ones(
        tmp_path, monkeypatch, good_library):
    """-march=native fails to compile TF's Eigen where it enables
    AVX512-FP16 (Sapphire Rapids, GCC 12): the build tries it without
    that, then without -march, and keeps the first that compiles."""
    directory = _private_dir(tmp_path / "kernels")
    log = tmp_path / "compiler_args"
    body = (f'echo "$ARGS" >> "{log}"\n'
            'case "$ARGS" in\n'
            '  *-mno-avx512fp16*) cp "' + str(good_library) + '" "$out" ;;\n'
            '  *-march=native*) echo "PacketMathFP16.h: error" >&2; exit 1 ;;\n'
            '  *) exit 1 ;;\n'
            'esac\n')
    script = _script(tmp_path / "picky_cxx", body)
    # _script's loop shifts the arguments away: keep them first.
    script.write_text(script.read_text().replace(
        "#!/bin/sh\n", '#!/bin/sh\nARGS="$*"\n', 1))
    monkeypatch.setenv("CXX", str(script))
    assert kernels.build(directory=str(directory)) == str(directory / _name())
    runs = log.read_text().splitlines()
    assert len(runs) == 2, runs
    assert "-march=native" in runs[0] and "-mno-avx512fp16" not in runs[0]
    assert "-march=native -mno-avx512fp16" in runs[1]
    _assert_verified(directory / _name(), good_library)


@pytest.mark.skipif(os.uname().machine != "x86_64" or not
                    shutil.which("objdump"), reason="reads x86-64 code")
def test_the_real_build_vectorises_the_update_loop():
    """The float loop compiles to packed square roots: with a branch in its
    body (an option tested per element) it compiled to scalar code at half
    the memory bandwidth on one thread."""
    code = subprocess.run(["objdump", "-d", kernels.build()],
                          capture_output=True, text=True, check=True).stdout
    assert "sqrtps" in code


def test_load_says_why_when_rebuilding_a_bad_library_fails(
        tmp_path, good_library):
    directory = _private_dir(tmp_path / "kernels")
    path = directory / _name()
    path.write_bytes(good_library.read_bytes()[:3000])
    (directory / (path.name + ".sha256")).write_text(
        f"{_sha256(good_library)}  {path.name}\n")
    compiler = _script(tmp_path / "bad_cxx", 'echo garbage > "$out"\n')
    outcome = _load_in_child(_env(TF_ADAMW_KERNEL_DIR=directory,
                                  CXX=compiler))
    assert not outcome["loaded"]
    reason = outcome["reason"]
    assert reason.startswith(f"KernelBuildError: the cached {path} was not "
                             "loaded (the library does not match its "
                             "checksum"), reason
    assert "rebuilding it failed: the compiled fused AdamW kernel does not " \
           "load" in reason, reason
    assert "the fused AdamW kernel is unavailable, using the XLA step" in \
        outcome["stderr"]
    assert path.stat().st_size == 3000  # not replaced by the garbage


def _plant(directory, planted_library, mode, foreign):
    """Another user's library, with a checksum that matches it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _name()
    shutil.copyfile(planted_library, path)
    checksum = directory / (path.name + ".sha256")
    checksum.write_text(f"{_sha256(path)}  {path.name}\n")
    directory.chmod(mode)
    if foreign:
        _give_away(directory, path, checksum)


def _unusable(tmp_path):
    """(package dir, $XDG_CACHE_HOME) that cannot be created: under a file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    return blocker / "_kernels", blocker


def _shared_temp(tmp_path):
    """A stand-in for /tmp: sticky, world-writable."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


def test_the_temporary_directory_is_per_user_and_private(tmp_path,
                                                         monkeypatch):
    package_dir, cache_home = _unusable(tmp_path)
    shared = _shared_temp(tmp_path)
    # Where earlier releases cached it, made by someone else first.
    squatted = shared / "tf_adamw_kernels"
    squatted.mkdir(mode=0o777)
    squatted.chmod(0o777)
    _give_away(squatted)
    monkeypatch.delenv("TF_ADAMW_KERNEL_DIR", raising=False)
    monkeypatch.setattr(builder, "_PACKAGE_DIR", str(package_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    monkeypatch.setattr("tempfile.tempdir", str(shared))
    private = shared / f"tf_adamw_kernels-{os.geteuid()}"
    assert kernels.library_path() == str(private / _name())
    info = private.stat()
    assert info.st_uid == os.geteuid()
    assert stat.S_IMODE(info.st_mode) == 0o700


def _temp_taken(tmp_path, planted_library):
    """Both temporary directory names taken by another user."""
    package_dir, cache_home = _unusable(tmp_path)
    shared = _shared_temp(tmp_path)
    for name in ("tf_adamw_kernels", f"tf_adamw_kernels-{os.geteuid()}"):
        _plant(shared / name, planted_library, 0o777, foreign=True)
    return package_dir, {"XDG_CACHE_HOME": cache_home, "TMPDIR": shared}


def _cache_home_taken(tmp_path, planted_library):
    package_dir, _ = _unusable(tmp_path)
    _plant(tmp_path / "cache" / "tf_adamw", planted_library, 0o755,
           foreign=True)
    return package_dir, {"XDG_CACHE_HOME": tmp_path / "cache",
                         "TMPDIR": _shared_temp(tmp_path)}


def _configured(mode, foreign):
    def setup(tmp_path, planted_library):
        _plant(tmp_path / "configured", planted_library, mode, foreign)
        return None, {"TF_ADAMW_KERNEL_DIR": tmp_path / "configured"}
    return setup


def _library_file(mode, foreign):
    def setup(tmp_path, planted_library):
        directory = _private_dir(tmp_path / "configured")
        _plant(directory, planted_library, 0o700, foreign=False)
        (directory / _name()).chmod(mode)
        if foreign:
            _give_away(directory / _name())
        return None, {"TF_ADAMW_KERNEL_DIR": directory}
    return setup


# (setup, whether the kernel still loads (from a fresh build elsewhere or in
# place), what the reason or the chosen directory says).
PLANTED = {
    "temp dir owned by another user": (
        _temp_taken, False, f"owned by uid {OTHER_UID}, not by this user"),
    "~/.cache/tf_adamw owned by another user": (
        _cache_home_taken, True, f"shared/tf_adamw_kernels-{os.geteuid()}"),
    "$TF_ADAMW_KERNEL_DIR world-writable": (
        _configured(0o777, foreign=False), False,
        "refusing $TF_ADAMW_KERNEL_DIR {dir}: it is writable by its group or "
        "by others (mode 0777)"),
    "$TF_ADAMW_KERNEL_DIR owned by another user": (
        _configured(0o755, foreign=True), False,
        f"refusing $TF_ADAMW_KERNEL_DIR {{dir}}: it is owned by uid "
        f"{OTHER_UID}"),
    "library owned by another user": (
        _library_file(0o755, foreign=True), True, "configured"),
    "library writable by its group": (
        _library_file(0o775, foreign=False), True, "configured"),
}


@pytest.mark.parametrize("case", PLANTED)
def test_a_planted_library_never_runs(tmp_path, planted_library,
                                      copying_compiler, case):
    setup, loads, expected = PLANTED[case]
    package_dir, env = setup(tmp_path, planted_library)
    marker = tmp_path / "planted_library_ran"
    compiler, _ = copying_compiler
    outcome = _load_in_child(
        _env(TF_ADAMW_TEST_MARKER=marker, CXX=compiler, **env), package_dir)
    assert not marker.exists(), "the planted library was loaded"
    assert outcome["loaded"] == loads, outcome["reason"]
    seen = outcome["path"] if loads else outcome["reason"]
    assert expected.format(dir=tmp_path / "configured") in seen, seen


def test_a_build_deletes_partial_files_of_killed_builds(
        tmp_path, monkeypatch, good_library, copying_compiler):
    directory = _private_dir(tmp_path / "kernels")
    name = _name()
    litter = [f"{name}.k1ll3d.partial", f"{name}.sha256.k1ll3d.partial",
              "tmpk1ll3d.so.partial"]  # an earlier release's name
    kept = ["fused_adamw_tf0.0_0000.so.running.partial",  # another TF's,
            "notes.partial"]                          # building now; not ours
    for file_name in litter + kept:
        (directory / file_name).write_bytes(b"\0" * 100)
    an_hour_ago = time.time() - 2 * 3600
    os.utime(directory / "tmpk1ll3d.so.partial", (an_hour_ago, an_hour_ago))
    monkeypatch.setenv("CXX", str(copying_compiler[0]))
    assert kernels.build(directory=str(directory)) == str(directory / name)
    assert sorted(os.listdir(directory)) == sorted(
        kept + [name, name + ".lock", name + ".sha256"])
    _assert_verified(directory / name, good_library)


def test_the_cached_path_starts_no_process(monkeypatch, good_library):
    """`python -m tf_adamw.kernels` (and `make venv`) leave a verified
    library: later processes hash it and load it, nothing more."""
    path = kernels.library_path()
    assert builder.unverified_reason(path) is None
    assert open(path + ".sha256", encoding="utf-8").read().split()[0] == \
        _sha256(good_library)

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    assert kernels.build() == path
