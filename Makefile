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

# The browser tests drive Debian's chromium (Playwright's own browser download is not reachable);
# the cluster tests (tests/cluster) need the `cluster` extra, and PostgreSQL and Redis (.ci/run installs them).
# eai-delphi without its requirements (vLLM, bitsandbytes): the `test` extra lists the few its readers import.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,cluster]'
	$(PY) -m pip install -q --no-deps eai-delphi==0.1.3
	command -v chromium >/dev/null || { apt-get install -y -q chromium || sudo apt-get install -y -q chromium; }
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

instance: install
	$(VENV)/bin/autointerp instance --max-runs $(AUTOINTERP_MAX_RUNS) --llm-runs $(AUTOINTERP_LLM_RUNS)

demo: instance
	$(VENV)/bin/autointerp demo

test: install-test
	$(VENV)/bin/pytest -q

# The Dagster UI and daemon at http://127.0.0.1:3000; UI_PORT=… to move it.
ui: instance
	$(VENV)/bin/autointerp ui --host 127.0.0.1 --port $(or $(UI_PORT),3000)

# The latent browser on the deployment's data root, at the port of its [settings] viewer_url
# (http://127.0.0.1:8080, where Dagster's metadata links point); VIEW_PORT=… to move it.
view: install
	$(VENV)/bin/autointerp view --host 127.0.0.1 $(if $(VIEW_PORT),--port $(VIEW_PORT))
