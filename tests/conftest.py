"""Test session set-up: load flash-sae exactly as a user does, through the kernel hub.

Without a GPU the real Triton kernels run under ``TRITON_INTERPRET=1``, which
must be set before the package's kernels are decorated, so it is set here,
before the kernel is loaded. Unless ``LOCAL_KERNELS`` already points at a
build (nix's ci-test sets it), the noarch variants are built with
``build_local.py`` and ``LOCAL_KERNELS`` is pointed at this checkout; then
``get_kernel(<repo-id from build.toml>, version=1)`` loads them offline.
"""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Interpreted kernels cost ~1 s an example, so the CPU profile draws fewer examples
# (derandomized, so CI is reproducible); the GPU profile draws many more.
settings.register_profile(
    "cpu", max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("gpu", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "cpu"))

ROOT = Path(__file__).resolve().parent.parent
REPO_ID = tomllib.loads((ROOT / "build.toml").read_text())["general"]["hub"]["repo-id"]


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels_ci: fast subset run by CI and nix's ci-test")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (large shapes)")


def _load_kernel():
    from kernels import get_kernel

    if "LOCAL_KERNELS" not in os.environ:
        subprocess.run([sys.executable, str(ROOT / "build_local.py")], check=True, capture_output=True)
        os.environ["LOCAL_KERNELS"] = f"{REPO_ID}={ROOT}"
    return get_kernel(REPO_ID, version=1)


@pytest.fixture(scope="session")
def fs():
    """The flash-sae module, loaded through kernels.get_kernel."""
    return _load_kernel()


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
