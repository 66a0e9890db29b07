# Two commands do all the set-up on a fresh Debian/Ubuntu box:
#   make serve   installs what is missing and starts Cube on port 3000
#   make test    installs what is missing and runs every test
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PLUGINS := $(wildcard plugins/*/pyproject.toml)
GUEST := $(wildcard guest/pyproject.toml)
VENV_KEY := $(shell cat pyproject.toml $(PLUGINS) $(GUEST) | sha256sum | cut -c1-16)
VENV_STAMP := $(VENV)/.cube-$(VENV_KEY)
PYTEST_ARGS ?=

.PHONY: install host venv kernel assets serve test lint clean-venv

install: host venv kernel assets

# Each step is a no-op when its inputs did not change: apt (a stamp keyed by the package list),
# the venv (a stamp keyed by every pyproject.toml), the kernel (cached by the hash of its inputs).
host:
	@start=$$(date +%s); echo "[set-up] Debian packages (scripts/apt-packages.txt)"; \
	  bash scripts/install-host.sh && echo "[set-up] Debian packages ready ($$(( $$(date +%s) - start )) s)"

venv: $(VENV_STAMP)

# order-only on host: the packages must be there, but installing them does not make the venv stale
$(VENV_STAMP): | host
	@echo "[set-up] Python venv $(VENV) (pyproject.toml changed or new; ~1 min)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install --progress-bar on -e '.[dev]' $(foreach p,$(PLUGINS),-e '$(dir $(p))[test]') \
	  $(if $(GUEST),-e 'guest[test]')
	@rm -f $(VENV)/.cube-*; touch $@

kernel: venv
	@$(VENV)/bin/cube kernel build

# the dashboard's chart library (npm's uplot, pinned by sha512), cached by content hash; a failure
# only warns: the dashboard then serves its pages without charts
assets: venv
	@$(PY) -m cube_dashboard.assets >/dev/null || true

# cube serve builds the guest kernel itself, beside the first template's root filesystem, and
# serves `base` as soon as it is ready while `code-interpreter-v1` still builds.
serve: host venv assets
	$(VENV)/bin/cube serve

# lint and types first (they need no kernel), then the kernel, then the tests that boot guests
test: host venv assets
	$(VENV)/bin/ruff check cube_core plugins tests docs $(if $(GUEST),guest)
	$(VENV)/bin/mypy cube_core $(dir $(wildcard plugins/*/cube_*/__init__.py))
	$(if $(GUEST),cd guest && ../$(VENV)/bin/mypy)
	@$(VENV)/bin/cube kernel build
	$(VENV)/bin/pytest --ignore=tests/e2e $(PYTEST_ARGS)
	$(VENV)/bin/pytest tests/e2e --ignore=tests/e2e/test_e2e_cluster.py $(PYTEST_ARGS)
	# a cluster (master + two nodes) on this box, in its own step after the single-box server has
	# stopped, so the two suites do not share the 2 cores (the nft tables of node `local` and the
	# cluster's nodes coexist: plugins/net_ebpf/README.md)
	$(VENV)/bin/pytest tests/e2e/test_e2e_cluster.py $(PYTEST_ARGS)
	$(if $(GUEST),cd guest && ../$(VENV)/bin/pytest $(PYTEST_ARGS))

lint: venv
	$(VENV)/bin/ruff check cube_core plugins
	$(VENV)/bin/mypy cube_core

clean-venv:
	rm -rf $(VENV)
