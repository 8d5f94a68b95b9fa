# make venv   - .venv with torch, torchvision and this package (editable, with test extras)
# make test   - the fast tests (SLOW=1 runs the slow ones too)
# make demo   - `kse demo` on Fashion-MNIST
#
# The venv is rebuilt only when pyproject.toml changes (stamp file .venv/.installed).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
PYTEST_MARK := $(if $(filter 1,$(SLOW)),,-m "not slow")

.PHONY: venv dataset test demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[test]'
	touch $@

# Debian's dataset-fashion-mnist package, where apt-get and root allow; otherwise nothing
# (kse looks in --data-dir and $$KSE_DATA too, and tests that need the real data skip).
dataset:
	@if [ ! -d $(FMNIST_DIR) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
	    || echo "note: could not install dataset-fashion-mnist; skipping"; \
	fi

test: venv dataset
	$(PY) -m pytest -q -x $(PYTEST_MARK)

demo: venv dataset
	$(VENV)/bin/kse demo
