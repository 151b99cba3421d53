"""`make install` asks for a torch build that fits the machine (mebt/torch_install.py)."""
import subprocess
import sys

from mebt.torch_install import CPU_INDEX, local_wheel, torch_pip_args
from tests.helpers import ROOT


def test_a_machine_without_nvidia_never_gets_the_cuda_build():
    args, why = torch_pip_args("2.13.0", has_nvidia=False, has_local_wheel=False, override=None)
    assert args[:3] == ["torch==2.13.0", "--index-url", CPU_INDEX] and "CPU build" in why
    args, why = torch_pip_args("2.13.0", has_nvidia=False, has_local_wheel=True, override=None)
    assert args == ["torch==2.13.0"] and "local wheel" in why
    args, why = torch_pip_args("2.13.0", has_nvidia=True, has_local_wheel=False, override=None)
    assert args == ["torch==2.13.0"] and "CUDA" in why
    assert torch_pip_args("2.13.0", False, False, "pypi")[0] == ["torch==2.13.0"]
    assert torch_pip_args("2.13.0", True, False, "https://example/whl")[0][1:3] == ["--index-url", "https://example/whl"]


def test_the_script_prints_pip_arguments_and_its_choice():
    # This machine has no NVIDIA driver and a local CPU wheel in pip's find-links: the plain spec.
    done = subprocess.run([sys.executable, str(ROOT / "mebt" / "torch_install.py"), "2.13.0"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.split()[0] == "torch==2.13.0" and done.stderr.startswith("make: installing torch 2.13.0: ")
    expected = ["torch==2.13.0"] if local_wheel("2.13.0") else ["torch==2.13.0", "--index-url", CPU_INDEX]
    assert done.stdout.split()[:len(expected)] == expected
