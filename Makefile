# Quick start: `make train` and `make test`.
# Every target sets up .venv itself; a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
CONFIG ?= tpu_configs/cpu_local.yaml
MODEL_DIR ?= runs/cpu_local

.PHONY: venv train test bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet -e '.[test,tfp]'
	# The fused CPU kernel (~10 s, once); without a compiler the optimizer
	# falls back to its XLA step and this only warns.
	$(VPY) -m tf_adamw.kernels || echo "warning: fused kernel not built" >&2
	touch $(STAMP)

# Trains the built-in default (a small character transformer, ~1 min on 2
# cores); re-running resumes from $(MODEL_DIR)'s latest checkpoint.
train: $(STAMP)
	$(VPY) -m tf_adamw.train --config_file=$(CONFIG) --model_dir=$(MODEL_DIR)

test: $(STAMP)
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

# Benchmarks (never part of the tests): see benchmarks/README.md.
bench:
	bash benchmarks/run.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# The R example (examples/r/README.md): R drives tf_adamw.keras.AdamW through
# reticulate. Debian's reticulate (1.28) refuses NumPy 2, so R gets a venv of
# its own with numpy<2 (TF 2.21 accepts NumPy >= 1.26). Needs `Rscript`
# (apt: r-base-core r-cran-reticulate); tests/test_r_example.py runs it.
R_VENV := .venv-r
R_VPY := $(R_VENV)/bin/python
R_STAMP := $(R_VENV)/.installed
R_OUT ?= runs/r_example
# --mirrored: also trains under a MirroredStrategy over 2 logical CPUs.
R_ARGS ?= --mirrored

.PHONY: r-venv r-example

r-venv: $(R_STAMP)

$(R_STAMP): setup.py
	test -x $(R_VPY) || $(PYTHON) -m venv $(R_VENV)
	$(R_VPY) -m pip install --quiet -e . 'numpy<2' 'tensorflow==2.21.0'
	$(R_VPY) -m tf_adamw.kernels || echo "warning: fused kernel not built" >&2
	touch $(R_STAMP)

# Trains, saves and reloads a small model from R into $(R_OUT).
r-example: $(R_STAMP)
	RETICULATE_PYTHON=$(abspath $(R_VPY)) Rscript examples/r/train_adamw.R \
		$(R_OUT) $(R_ARGS)
