"""examples/r/: tf_adamw.keras.AdamW driven from R through reticulate.

Runs `examples/r/train_adamw.R` with `Rscript` in the R example's own venv
(`make r-venv`: .venv-r, numpy<2, since Debian's reticulate 1.28 refuses
NumPy 2). The script compiles a Keras model with the argument names of R's
`optimizer_adam_w()`, the counts given as R doubles
(`gradient_accumulation_steps = 4`, `ema_overwrite_frequency = 100`) and
`NULL` for None, trains it with `fit()` on one device and under a
MirroredStrategy over 2 logical CPUs, saves it as .keras and loads it back.

Skipped when `Rscript` is not on PATH (CI installs r-base-core and
r-cran-reticulate with apt: .ci/run). The first run creates .venv-r (about a
minute with pip's cache). This file imports no TensorFlow: everything
happens in the R process.
"""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "r" / "train_adamw.R"
R_PYTHON = ROOT / ".venv-r" / "bin" / "python"

LOSS_LINE = re.compile(
    r"^\[(?P<label>[^\]]+)\] loss: first epoch (?P<first>\S+) -> "
    r"last epoch (?P<last>\S+) \(decreased\)$", re.MULTILINE)
ITERATIONS_LINE = re.compile(
    r"^\[(?P<label>[^\]]+)\] iterations: (?P<trained>\d+) "
    r"\(after reload: (?P<reloaded>\d+)\)$", re.MULTILINE)

pytestmark = [
    pytest.mark.skipif(shutil.which("Rscript") is None,
                       reason="Rscript not on PATH (apt-get install "
                       "r-base-core r-cran-reticulate)"),
    pytest.mark.multiprocess,
    pytest.mark.slow,
]


def _tail(text, lines=60):
    return "\n".join(text.splitlines()[-lines:])


def test_r_example_trains_saves_and_reloads(tmp_path):
    """The R script exits 0, writes both .keras files, and reports a loss
    that went down and `iterations` that came back after `load_model`."""
    assert SCRIPT.is_file(), SCRIPT
    made = subprocess.run(["make", "r-venv"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert made.returncode == 0, (
        f"make r-venv failed:\n{_tail(made.stdout)}\n{_tail(made.stderr)}")
    assert R_PYTHON.is_file(), R_PYTHON

    env = dict(os.environ, RETICULATE_PYTHON=str(R_PYTHON))
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    out_dir = tmp_path / "r_out"
    run = subprocess.run(
        ["Rscript", str(SCRIPT), str(out_dir), "--mirrored"], cwd=ROOT,
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, (
        f"Rscript exited {run.returncode}:\n{_tail(run.stdout)}\n"
        f"{_tail(run.stderr)}")

    for name in ("model.keras", "model_mirrored.keras"):
        saved = out_dir / name
        assert saved.is_file() and saved.stat().st_size > 0, run.stdout

    losses = {m["label"]: (float(m["first"]), float(m["last"]))
              for m in LOSS_LINE.finditer(run.stdout)}
    assert set(losses) == {"one device", "mirrored"}, run.stdout
    for label, (first, last) in losses.items():
        assert last < first, (label, first, last)

    iterations = {m["label"]: (int(m["trained"]), int(m["reloaded"]))
                  for m in ITERATIONS_LINE.finditer(run.stdout)}
    assert set(iterations) == {"one device", "mirrored"}, run.stdout
    for label, (trained, reloaded) in iterations.items():
        # 8 epochs x 128 batches / gradient_accumulation_steps = 4.
        assert trained == reloaded == 256, (label, trained, reloaded)
    assert "[mirrored] replicas: 2" in run.stdout
    assert run.stdout.rstrip().endswith("OK"), run.stdout
