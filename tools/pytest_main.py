"""Entry point of the Bazel py_test targets: runs pytest on the listed files.

Usage (from a py_test's `args`): pytest_main.py [pytest options] FILE...

Bazel runs a test with its working directory at the workspace root inside the
runfiles tree, where the BUILD target's srcs and data (the test files,
tests/conftest.py, helper modules, pytest.ini) are symlinked. pytest runs
there with the repository's pytest.ini, so tests/conftest.py is loaded before
any test module imports TensorFlow (it sets up the 4 logical CPUs). The
package tf_adamw is imported from the runfiles tree, which the Python stub puts
on sys.path ahead of the virtualenv's editable install: a module missing from
the BUILD file's py_library fails the Bazel test.

Results go to Bazel's $XML_OUTPUT_FILE (JUnit XML) and temporary files under
$TEST_TMPDIR, when Bazel sets them.
"""

import os
import sys

import pytest

_REQUIRED = ("pytest.ini", os.path.join("tests", "conftest.py"))


def main(argv):
    missing = [path for path in _REQUIRED if not os.path.exists(path)]
    if missing:
        sys.stderr.write(
            "pytest_main: {} not in the runfiles tree (cwd {}); add them to "
            "the test target's data in BUILD.\n".format(", ".join(missing), os.getcwd())
        )
        return 2
    args = ["-c", "pytest.ini", "--rootdir", os.getcwd()]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    if os.environ.get("TEST_TMPDIR"):
        args.append("--basetemp=" + os.path.join(os.environ["TEST_TMPDIR"], "pytest"))
    return int(pytest.main(args + list(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
