# Two commands do all set-up: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export AUTOINTERP_DATA ?= $(CURDIR)/data

.PHONY: install demo test ui bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/autointerp demo

test: install
	$(VENV)/bin/pytest -q

ui: install
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster dev -m autointerp_defs -h 127.0.0.1 -p 3000
