# Quick start: `make test` (and, once the trainer lands, `make train`).
# Every target sets up .venv itself; a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet -e '.[test,tfp]'
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
