# The virtual environment lives outside the checkout, keyed by the dependency
# list, so that repeated CI runs and fresh clones reuse one install.
PYTHON ?= python3
DEPS_HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-12)
VENV ?= $(HOME)/.cache/ndot/venv-$(DEPS_HASH)
PY := $(VENV)/bin/python
# The checkout itself is on the path: the shared venv holds no ndot of its own.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup smoke train test bench

setup: $(VENV)/.installed

# The dependencies only: the environment is shared by every checkout, and an install
# of the project in it would have a bare `python` in any of them run the one that built it.
# (Without PYTHONPATH: through it pip would find this checkout's ndot.egg-info and keep the install.)
$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	env -u PYTHONPATH $(PY) -m pip uninstall -q -y ndot
	cd / && ! env -u PYTHONPATH $(PY) -c 'import ndot' 2>/dev/null
	touch $@

smoke: setup
	$(PY) sweeps/timesteps.py --preset smoke

train: setup
	$(PY) -m ndot.train --dataset digits --arch small_cnn --rule ndot --mode A --T 4 --epochs 6 --batch_size 32

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m ndot.bench --small
