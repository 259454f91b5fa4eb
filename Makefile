# fabflows: two commands on a fresh machine (as root):
#   make demo   - install what is missing, bring up the local sandbox, run describe-environment
#   make test   - install what is missing, run the whole test suite against real peers
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Exact versions of everything installed (`make lock` regenerates it from pyproject's ranges).
LOCK := requirements.lock

.PHONY: demo test crash-matrix e2e-notifications system venv lock lint bench sandbox-down clean

system:
	bash .ci/install-system

# pip and setuptools first (the venv's own pip is older), then the project with every
# dependency pinned by the lock, and the build backend too: no resolution, no backtracking.
$(STAMP): pyproject.toml setup.py $(LOCK)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c $(LOCK) pip setuptools
	$(VENV)/bin/pip install -q -c $(LOCK) --build-constraint $(LOCK) -e '.[test]'
	$(VENV)/bin/pip check
	touch $(STAMP)

venv: $(STAMP)

demo: system venv
	$(VENV)/bin/fabflows demo

test: system venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not crash_matrix and not notifications_e2e"

crash-matrix: system venv
	$(VENV)/bin/pytest -m crash_matrix

e2e-notifications: system venv
	$(VENV)/bin/pytest -m notifications_e2e

lock:
	bash .ci/lock

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

sandbox-down: venv
	$(VENV)/bin/fabflows sandbox down
