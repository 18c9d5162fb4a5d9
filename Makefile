# GR-2 Serve. The two commands a new machine needs:
#   make demo   install, start policy server + WBC agent + simulated Gen3, run one episode -> out/demo/
#   make test   install (redis-server through apt when missing) and run the whole test suite
# Knobs: PYTHON (interpreter for the venv, 3.11+), VENV (default .venv), PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gr2-installed
export MUJOCO_GL ?= egl
export PYTHONUNBUFFERED := 1

PACKAGE_FILES := proto/pyproject.toml clients/pyproject.toml services/wbc_agent/pyproject.toml \
	training/pyproject.toml \
	services/policy_server/pyproject.toml requirements-dev.txt constraints.txt

.PHONY: install system-deps demo test lint format proto clean

install: system-deps $(STAMP)

system-deps:
	@PYTHON=$(PYTHON) bash scripts/ensure_system_deps.sh

$(STAMP): $(PACKAGE_FILES)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "GR-2 Serve needs Python 3.11+ (set PYTHON=...)")'
	@echo "[gr2] creating $(VENV) and installing packages (first run takes a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt \
		torch==2.13.0 \
		-e proto -e clients -e services/wbc_agent -e services/policy_server -e training \
		-r requirements-dev.txt
	@touch $(STAMP)

demo: install
	$(PY) scripts/demo.py --out out/demo

test: install
	@WITH_BROWSER=1 WITH_PROMTOOL=1 PYTHON=$(PYTHON) bash scripts/ensure_system_deps.sh
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/buf lint

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

proto: install
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) out .pytest_cache
