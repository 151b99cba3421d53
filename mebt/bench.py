"""Where `mebt bench` finds its scripts: the top-level benchmarks/ folder of a source checkout.

benchmarks/ is not installed (it would land in site-packages as a package named `benchmarks`); an editable
install (what `make` does) points mebt at the checkout, and the folder next to the package is used from there.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from mebt.errors import UserError

# The checkout's root when mebt runs from a source tree (editable install, `python -m mebt.cli` in a clone).
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(module: str) -> ModuleType:
    """The benchmark module ``module`` (e.g. "benchmarks.train_scaling"), with a ``main(argv)`` to run.

    The checkout next to the mebt package comes first on sys.path, so its benchmarks/ is the one used even
    where an editable install exposes only the installed packages. Without a source tree: a UserError
    naming the fix. A missing dependency of the benchmark itself is raised as it is.
    """
    if (SOURCE_ROOT / "benchmarks" / "__init__.py").is_file() and str(SOURCE_ROOT) not in sys.path:
        sys.path.insert(0, str(SOURCE_ROOT))
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise
        raise UserError(f"mebt bench needs the benchmarks/ folder of a source checkout ({module} not found; "
                        f"it is not installed with the package): clone the repository and run `pip install -e .` "
                        f"(or `make bench`) there") from None
