# The virtual environment lives outside the checkout, keyed by the dependency
# list, so that repeated CI runs and fresh clones reuse one install.
PYTHON ?= python3
DEPS_HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-12)
VENV ?= $(HOME)/.cache/ndot/venv-$(DEPS_HASH)
PY := $(VENV)/bin/python
# The checkout itself comes first on the path: the venv is shared by every checkout
# (and clone) of the same dependency list, so its editable install may point at another one.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup smoke train test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

smoke: setup
	$(PY) sweeps/timesteps.py --preset smoke

train: setup
	$(PY) -m ndot.train --dataset digits --arch small_cnn --rule ndot --mode A --T 4 --epochs 6 --batch_size 32

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m ndot.bench --small
