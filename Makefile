# The two commands a new user needs: `make demo` and `make test`. Each does all set-up.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv assets browser lint test demo bench clean
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# torch==2.13.0 first: it is the CPU build these machines carry; an unpinned torch
# would pull a multi-GB CUDA build. The worker extra's `torch>=2.2` is then satisfied.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[operator,worker,dev]'
	touch $(STAMP)

venv: $(STAMP)

# etcd + kube-apiserver for the local control plane, built once and cached in ~/.cache/gpuroute.
assets:
	bash gpuroute_dev/localenv/kube-assets.sh >/dev/null

# Headless Chromium for the status-page test (Debian's package; no browser download).
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# Style, types (strict for the operator's pure core) and the import contracts (layers, a pure core).
lint: venv
	$(VENV)/bin/ruff check operator gpuroute gpuroute_dev worker_image bench tests
	$(VENV)/bin/mypy operator/gpuroute_operator gpuroute gpuroute_dev
	$(VENV)/bin/mypy --strict operator/gpuroute_operator/core
	$(VENV)/bin/lint-imports

test: venv assets browser lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv assets
	$(PY) -m gpuroute.cli demo

bench: venv assets
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) demo-output .pytest_cache
