"""Every code block in README.md runs as written.

Each fenced block is one test, named after its nearest heading
(`test_block[a-custom-training-loop-1]`): ```python blocks run in a fresh
process in an empty temporary directory, ```sh blocks in bash, output
blocks are not run. Names the README elides on purpose come from a prelude
(`<!-- readme-test: prelude NAME -->` right before the block), blocks that
cannot run here carry `<!-- readme-test: skip REASON -->`, and the session
summary lists every block with what was done with it and each skip's
reason. tests/readme_harness.py documents the directives and holds the
preludes.

The block tests start TensorFlow processes (3-10 s each): marked
`multiprocess` and `slow`. The parser tests are fast.
"""

import os

import pytest

import readme_harness
from readme_harness import Block, ReadmeError, parse

if not os.path.isfile(readme_harness.README):  # pragma: no cover - runfiles
    pytest.skip("README.md not found beside tests/", allow_module_level=True)

BLOCKS = readme_harness.read_blocks()


class _Summary:
    """Adds "README.md code blocks" to the terminal summary."""

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_sep("-", "README.md code blocks")
        for block in BLOCKS:
            terminalreporter.write_line(block.describe())
        skipped = sum(b.directive == "skip" for b in BLOCKS)
        terminalreporter.write_line(
            f"{len(BLOCKS)} blocks, {skipped} skipped (reasons above; "
            "directives: tests/readme_harness.py)")


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("readme_blocks_summary"):
        manager.register(_Summary(), "readme_blocks_summary")


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.test_id for b in BLOCKS])
def test_block(block, tmp_path):
    if block.directive == "skip":
        pytest.skip(f"README.md line {block.line}: {block.argument}")
    if block.kind == "output":
        pytest.skip("output, not run")
    failure = readme_harness.run_block(block, BLOCKS, str(tmp_path))
    if failure:
        pytest.fail(failure, pytrace=False)


# ----------------------------------------------------------------------------
# The harness itself (no processes).


def test_readme_has_the_blocks_it_documents():
    kinds = {b.kind for b in BLOCKS}
    assert {"python", "sh", "output"} <= kinds
    assert len({b.test_id for b in BLOCKS}) == len(BLOCKS)
    unknown = [b.describe() for b in BLOCKS
               if b.kind == "unknown" and b.directive != "skip"]
    assert not unknown, f"no runner for these blocks: {unknown}"


def test_every_prelude_is_used_and_its_chained_blocks_exist():
    used = {b.argument for b in BLOCKS if b.directive == "prelude"}
    assert used == set(readme_harness.PRELUDES), (
        "unused preludes: "
        f"{sorted(set(readme_harness.PRELUDES) - used)}")
    for block in BLOCKS:
        if block.directive == "prelude":
            script = readme_harness.python_script(block, BLOCKS)
            assert block.code.rstrip() in script


def test_parse_directives_headings_and_languages():
    text = """# Title

```sh
make train
```

## A section

<!-- readme-test: prelude dataset -->
```python
for x, y in dataset:
    pass
```

<!-- readme-test: skip needs a TPU -->

```python
tpu()
```

````text
```
nested
```
````
"""
    blocks = parse(text)
    assert [(b.heading, b.number, b.lang, b.directive, b.argument, b.line)
            for b in blocks] == [
        ("Title", 1, "sh", "", "", 3),
        ("A section", 1, "python", "prelude", "dataset", 10),
        ("A section", 2, "python", "skip", "needs a TPU", 17),
        ("A section", 3, "text", "", "", 21),
    ]
    assert blocks[1].code == "for x, y in dataset:\n    pass\n"
    assert blocks[3].code == "```\nnested\n```\n"
    assert blocks[1].test_id == "a-section-1"
    assert [b.kind for b in blocks] == ["sh", "python", "python", "output"]


@pytest.mark.parametrize("text, message", [
    ("<!-- readme-test: skip -->\n```sh\nx\n```\n", "needs a reason"),
    ("<!-- readme-test: prelude nope -->\n```python\nx\n```\n",
     "no prelude 'nope'"),
    ("<!-- readme-test: prelude dataset -->\n```sh\nx\n```\n",
     "preludes are for python"),
    ("<!-- readme-test: skip x -->\ntext\n```sh\nx\n```\n",
     "not right before a code block"),
    ("<!-- readme-test: skip x -->\n", "not right before a code block"),
    ("<!-- readme-test: run -->\n```sh\nx\n```\n", "not a readme-test"),
    ("<!-- readme-test: usage -->\n```\nout\n```\n", "for sh blocks"),
    ("```python\nx\n", "never closed"),
])
def test_parse_rejects_malformed_directives(text, message):
    with pytest.raises(ReadmeError, match=message):
        parse(text)


def test_fence_in_a_list_item_is_dedented():
    (block,) = parse("- Run:\n\n  ```python\n  if True:\n      x = 1\n  ```\n")
    assert block.code == "if True:\n    x = 1\n"


@pytest.mark.multiprocess
def test_run_block_runs_in_an_empty_directory_and_reports_failures(tmp_path):
    ok = Block("H", 1, "sh", "test -z \"$(ls)\"\necho hi > out.txt\n"
               "python -c 'import sys; sys.exit(0)'\n", 3)
    assert readme_harness.run_block(ok, [ok], str(tmp_path / "a")) is None
    assert (tmp_path / "a" / "cwd" / "out.txt").read_text() == "hi\n"
    bad = Block("H", 2, "python", "import os\nraise SystemExit(os.getcwd())\n", 9)
    failure = readme_harness.run_block(bad, [bad], str(tmp_path / "b"))
    assert "README.md line 9 (h-2) failed" in failure
    assert "exit status 1" in failure and str(tmp_path / "b" / "cwd") in failure
    assert "raise SystemExit(os.getcwd())" in failure  # the numbered script
    odd = Block("H", 3, "cpp", "int main() {}\n", 12)
    with pytest.raises(ReadmeError, match="no runner for language 'cpp'"):
        readme_harness.run_block(odd, [odd], str(tmp_path / "c"))


def test_script_runs_prelude_block_and_check_in_order():
    block = Block("A custom training loop", 1, "python", "BLOCK = 1\n", 5,
                  "prelude", "dataset")
    script = readme_harness.python_script(block, [block])
    prelude = readme_harness.PRELUDES["dataset"]
    assert (script.index(prelude.parts[0].rstrip())
            < script.index("BLOCK = 1")
            < script.index(prelude.check.rstrip()))
