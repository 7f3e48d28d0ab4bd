# Two set-up commands on a fresh machine: `make demo` and `make test`. Both install into .venv/ first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Quiet, offline-friendly defaults for every tool we start (no telemetry, no progress bars).
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: install demo test test-fast serve bench lint clean

install: $(STAMP)

# torch first, from the pinned CPU build; then everything else under the full constraint set,
# so nothing can pull a CUDA torch or drift from the versions the tests ran with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip==26.0.1 || $(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/pip install -q -e '.[dev]' -c constraints.txt
	touch $@

# Prefect keeps the demo's flow runs under .brainlm/prefect, the same home `make serve` uses, so its UI shows them
# (flows/demo.py creates the folder). The demo writes only untracked, git-ignored files in this checkout.
demo: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.brainlm/prefect $(BIN)/python -m flows.demo

# The layering rules first (import-linter contracts in pyproject.toml: DESIGN.md's one home per concern).
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

serve: $(STAMP)
	bash infra/local/serve.sh

bench: $(STAMP)
	$(BIN)/python bench/pretrain_throughput.py --preset tiny

lint: $(STAMP)
	$(BIN)/ruff check brainlm flows bench tests
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .brainlm
