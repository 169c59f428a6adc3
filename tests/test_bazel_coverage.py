"""Every Python file of the package and of the test suite is in a Bazel target.

Bazel only sees files that a BUILD file lists. The BUILD files list them by
name (no glob), so a new module or test file has to be added by hand; these
tests fail until it is, naming the file and the BUILD file to edit.

The BUILD files are evaluated as Python with stand-ins for Bazel's functions
(Starlark BUILD files are Python-compatible), so list variables and
concatenation work. Files matched only by glob() do not count.

No TensorFlow import: this runs in well under a second.
"""

import builtins
import os
import pathlib

import pytest

# This file may be run from Bazel's runfiles tree (a symlink farm): resolve to
# the source tree, where the BUILD files and every source file are.
ROOT = pathlib.Path(__file__).resolve().parents[1]

BUILD_NAMES = ("BUILD", "BUILD.bazel")
PYTHON_RULES = ("py_library", "py_binary", "py_test")

if not (ROOT / "WORKSPACE").is_file():  # pragma: no cover - copied runfiles
    pytest.skip("source tree with WORKSPACE not found", allow_module_level=True)


def _ignored_dirs():
    """Top-level directories Bazel skips: .bazelignore, plus convenience symlinks."""
    ignore_file = ROOT / ".bazelignore"
    names = set()
    if ignore_file.is_file():
        for line in ignore_file.read_text().splitlines():
            line = line.strip().rstrip("/")
            if line and not line.startswith("#"):
                names.add(line)
    return names


def _is_other_repository(directory):
    return any((directory / name).exists() for name in ("WORKSPACE", "WORKSPACE.bazel"))


def _build_files():
    """BUILD files of the main repository, as paths relative to ROOT.

    Skips ignored directories, bazel-* symlinks, hidden directories and nested
    repositories (directories with their own WORKSPACE, e.g. the stubs in
    third_party/bazel_stubs).
    """
    ignored = _ignored_dirs()
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = pathlib.Path(dirpath).relative_to(ROOT)
        keep = []
        for name in dirnames:
            rel = (rel_dir / name).as_posix()
            if (
                rel in ignored
                or name.startswith((".", "bazel-"))
                or name == "__pycache__"
                or _is_other_repository(pathlib.Path(dirpath) / name)
            ):
                continue
            keep.append(name)
        dirnames[:] = sorted(keep)
        for name in BUILD_NAMES:
            if name in filenames:
                found.append(rel_dir / name)
                break
    return found


class _Rule:
    def __init__(self, kind, build_file, attrs):
        self.kind = kind
        self.build_file = build_file
        self.name = attrs.get("name", "?")
        self.attrs = attrs

    def files(self, attr):
        """Repo-relative paths of the files named in a label-list attribute."""
        package = self.build_file.parent
        out = set()
        labels = self.attrs.get(attr) or []
        if isinstance(labels, str):  # e.g. main
            labels = [labels]
        for label in labels:
            if not isinstance(label, str) or label.startswith("@"):
                continue
            if label.startswith("//"):
                pkg, _, name = label[2:].partition(":")
                if not name:
                    continue  # a package's default target, not a file
                path = pathlib.PurePosixPath(pkg) / name
            else:
                path = pathlib.PurePosixPath(package.as_posix()) / label.lstrip(":")
            out.add(path.as_posix())
        return out


class _Namespace(dict):
    """Globals of a BUILD file: any unknown name is a rule that gets recorded."""

    def __init__(self, build_file, rules):
        super().__init__()
        self._build_file = build_file
        self._rules = rules
        self["glob"] = lambda *a, **k: []  # globbed files do not count
        self["select"] = lambda mapping, **k: [x for v in mapping.values() for x in v]
        self["load"] = self._load

    def _rule(self, kind):
        def record(*args, **attrs):
            self._rules.append(_Rule(kind, self._build_file, attrs))

        return record

    def _load(self, _bzl, *symbols, **aliases):
        for name in list(symbols) + list(aliases):
            self[name] = self._rule(name)

    def __missing__(self, key):
        if hasattr(builtins, key):  # len, str, list, ... as in Starlark
            return getattr(builtins, key)
        return self._rule(key)


def _rules():
    rules = []
    for build_file in _build_files():
        source = (ROOT / build_file).read_text()
        namespace = _Namespace(build_file, rules)
        code = compile(source, str(ROOT / build_file), "exec")
        exec(code, {}, namespace)  # pylint: disable=exec-used
    return rules


RULES = _rules()


def _listed(kinds, attrs):
    listed = set()
    for rule in RULES:
        if rule.kind in kinds:
            for attr in attrs:
                listed |= rule.files(attr)
    return listed


def _owner(path):
    """The BUILD file that owns a source file: the nearest one above it."""
    directory = (ROOT / path).parent
    while True:
        for name in BUILD_NAMES:
            if (directory / name).is_file():
                return (directory / name).relative_to(ROOT).as_posix()
        if directory == ROOT:
            return "BUILD"
        directory = directory.parent


def _sources(pattern_dir, pattern):
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / pattern_dir).rglob(pattern)
        if "__pycache__" not in p.parts
    )


def _message(missing, what):
    return "\n".join(
        ["Not in any Bazel target (%s):" % what]
        + ["  %s  -> add it to %s" % (path, _owner(path)) for path in missing]
    )


def test_build_files_found():
    assert "BUILD" in {p.as_posix() for p in _build_files()}
    assert any(r.kind == "py_library" for r in RULES), "no py_library in the BUILD files"
    assert any(r.kind == "py_test" for r in RULES), "no py_test in the BUILD files"


def test_every_package_module_is_in_a_python_target():
    listed = _listed(PYTHON_RULES, ("srcs",))
    missing = [p for p in _sources("tf_adamw", "*.py") if p not in listed]
    assert not missing, _message(missing, "srcs of a py_library, py_binary or py_test")


def test_every_test_file_is_in_a_py_test():
    listed = _listed(("py_test",), ("srcs",))
    missing = [p for p in _sources("tests", "test_*.py") if p not in listed]
    assert not missing, _message(missing, "srcs of a py_test, e.g. TEST_SRCS")


def test_every_test_helper_is_in_a_py_test():
    """conftest.py and helper modules: the tests import them from runfiles."""
    listed = _listed(("py_test",), ("srcs", "data"))
    missing = [
        p
        for p in _sources("tests", "*.py")
        if p not in listed and not os.path.basename(p).startswith("test_")
    ]
    assert not missing, _message(missing, "srcs or data of a py_test, e.g. TEST_HELPERS")


def test_listed_python_files_exist():
    """A stale entry (file renamed or deleted) fails Bazel with 'missing input file'."""
    stale = sorted(
        (path, rule.build_file.as_posix())
        for rule in RULES
        if rule.kind in PYTHON_RULES
        for attr in ("srcs", "data", "main")
        for path in rule.files(attr)
        if path.endswith(".py") and not (ROOT / path).is_file()
    )
    assert not stale, "Listed in BUILD but missing on disk:\n" + "\n".join(
        "  %s  -> remove it from %s" % entry for entry in stale
    )


def test_virtualenvs_are_bazelignored():
    """`bazel test //...` walks every directory: TensorFlow's wheel ships BUILD
    files (tensorflow/include/external/...) that fail to load."""
    ignored = _ignored_dirs()
    venvs = sorted(
        p.name for p in ROOT.iterdir() if p.is_dir() and (p / "pyvenv.cfg").is_file()
    )
    missing = [v for v in venvs if v not in ignored]
    assert not missing, "Virtualenv(s) %s not in .bazelignore: add a line for each." % missing
