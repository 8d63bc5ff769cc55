# Two commands do all set-up: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export AUTOINTERP_DATA ?= $(CURDIR)/data

.PHONY: install install-test demo test ui

# torch first, pinned to the CPU build that is on this machine's disk (any other pulls GBs).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/autointerp demo

test: install-test
	$(VENV)/bin/pytest -q

ui: install
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster dev -m autointerp_defs -h 127.0.0.1 -p 3000
