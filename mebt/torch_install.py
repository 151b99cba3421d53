"""Which torch build `make install` asks pip for: one that fits the machine, never gigabytes it cannot use.

On Linux, PyPI's ``torch`` is the CUDA build (with several GB of nvidia-* wheels), even on a laptop without
a GPU. So:

- a machine with an NVIDIA driver (``nvidia-smi`` on PATH) gets PyPI's build, as pip would pick it;
- a machine without one gets the CPU build: from a local wheel when pip's configuration offers one (a
  ``--find-links`` folder, as on this project's CI machines), else from PyTorch's CPU index;
- ``TORCH_INDEX=URL`` chooses the index explicitly (``TORCH_INDEX=pypi`` for PyPI's default).

Run by the Makefile as ``python mebt/torch_install.py VERSION``: it prints the pip arguments, one per line,
and what it chose on stderr. It imports nothing from mebt (the package is installed after torch).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def local_wheel(version: str, python: str = sys.executable) -> bool:
    """Whether pip finds ``torch==version`` without any index (a find-links folder of its configuration)."""
    probe = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--quiet",
                            f"torch=={version}"], capture_output=True, text=True)
    return probe.returncode == 0


def torch_pip_args(version: str, has_nvidia: bool, has_local_wheel: bool, override: str | None) -> tuple[list[str], str]:
    """(pip install arguments, why) for this machine."""
    spec = f"torch=={version}"
    if override == "pypi":
        return [spec], "PyPI's default build (TORCH_INDEX=pypi)"
    if override:
        return [spec, "--index-url", override, "--extra-index-url", "https://pypi.org/simple"], \
            f"the index TORCH_INDEX={override}"
    if has_nvidia:
        return [spec], "the CUDA build from PyPI (an NVIDIA driver was found)"
    if has_local_wheel:
        return [spec], "the CPU build from a local wheel (no NVIDIA driver found)"
    return [spec, "--index-url", CPU_INDEX, "--extra-index-url", "https://pypi.org/simple"], \
        "the CPU build from PyTorch's CPU index (no NVIDIA driver found; TORCH_INDEX=pypi for PyPI's build)"


def main(argv: list[str]) -> int:
    version = argv[0] if argv else "2.13.0"
    override = os.environ.get("TORCH_INDEX") or None
    has_nvidia = shutil.which("nvidia-smi") is not None
    args, why = torch_pip_args(version, has_nvidia, not override and not has_nvidia and local_wheel(version), override)
    print(f"make: installing torch {version}: {why}", file=sys.stderr)
    print("\n".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
