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
