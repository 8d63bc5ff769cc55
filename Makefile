# Two commands do all set-up: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# Runs in progress at once, and of those how many may wait on the LLM (explanations, LLM scorers);
# runs that load the subject model always go one at a time. Written into $(DAGSTER_HOME)/dagster.yaml.
AUTOINTERP_MAX_RUNS ?= 2
AUTOINTERP_LLM_RUNS ?= 2

.PHONY: install install-test instance demo test ui view

# torch first, the CPU build that is on this machine's disk (any other pulls GBs); pyproject.toml asks only for a range
# (torch>=2.4), so a GPU machine keeps its own torch and the vllm extra gets the newest vLLM (bench/dependencies.py).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

# What the tests need from Debian, installed where missing (as root, or through sudo): chromium for the browser tests
# (Playwright's own browser download is not reachable); PostgreSQL, Redis and iproute2 for the cluster tests (tests/cluster),
# which also need the `cluster` extra. eai-delphi without its requirements (vLLM, bitsandbytes): the `test` extra lists the
# few its readers import. circuit-tracer (the label-graph test) without its requirements either: it pins
# huggingface-hub<1 and transformers<=4.57.3; what its graph files and loader import is installed already.
APT_TEST_PACKAGES := chromium postgresql redis-server iproute2
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,cluster]'
	$(PY) -m pip install -q --no-deps eai-delphi==0.1.3
	$(PY) -m pip install -q --no-deps circuit-tracer==0.5.0
	{ command -v chromium && command -v redis-server && command -v ip && ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_TEST_PACKAGES) >/dev/null; }
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

instance: install
	$(VENV)/bin/autointerp instance --max-runs $(AUTOINTERP_MAX_RUNS) --llm-runs $(AUTOINTERP_LLM_RUNS)

demo: instance
	$(VENV)/bin/autointerp demo

# ruff first (its rules in pyproject.toml: the formatter at 100 columns, lint with E501 at 120), then the docs site (docs/, mkdocs.yml): --strict fails on a broken link or anchor, a page missing from the nav,
# or an API page that does not resolve; built into .site/ (ignored by git). No -q: it hides the warnings --strict counts.
# Then the tests on TEST_WORKERS pytest-xdist workers, each taking whole modules (their module fixtures built once),
# the modules of tests marked slow first (tests/conftest.py). More workers than cores: many tests wait on
# subprocesses, servers and Dagster's daemons rather than compute. On a fresh clone of this 2-core machine kind
# (2026-12-08): 3 workers, 468 passed, `make test` 13 min 9 s with the venv installed (one process: 21 min 38 s).
# TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 3
test: install-test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d $(CURDIR)/.site
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The Dagster UI and daemon at http://127.0.0.1:3000; UI_PORT=… to move it.
ui: instance
	$(VENV)/bin/autointerp ui --host 127.0.0.1 --port $(or $(UI_PORT),3000)

# The latent browser on the deployment's data root, at the port of its [settings] viewer_url
# (http://127.0.0.1:8080, where Dagster's metadata links point); VIEW_PORT=… to move it.
view: install
	$(VENV)/bin/autointerp view --host 127.0.0.1 $(if $(VIEW_PORT),--port $(VIEW_PORT))
