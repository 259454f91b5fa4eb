# fabflows: two commands on a fresh machine (as root):
#   make demo   - install what is missing, bring up the local sandbox, run describe-environment
#   make test   - install what is missing, run the whole test suite against real peers
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test system venv lint bench sandbox-down clean

system:
	bash .ci/install-system

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: system venv
	$(VENV)/bin/fabflows demo

test: system venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

sandbox-down: venv
	$(VENV)/bin/fabflows sandbox down
