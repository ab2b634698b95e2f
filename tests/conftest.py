"""Test session set-up: load flash-sae exactly as a user does, through the kernel hub.

Without a GPU the real Triton kernels run under ``TRITON_INTERPRET=1``, which
must be set before the package's kernels are decorated, so it is set here,
before the kernel is loaded. ``build_local.load_kernel`` (the one loader the
tests, benchmarks and example share) builds the noarch variants and loads
them with ``get_kernel(<repo id from build.toml>, version=1)`` through
``LOCAL_KERNELS``, unless ``LOCAL_KERNELS`` already points at a build (nix's
ci-test sets it).

Hypothesis profiles (``HYPOTHESIS_PROFILE`` picks one):
- ``quick``, the default on a machine without a GPU: 3 derandomized examples
  per property test, for a fast local run;
- ``full``, the default when ``CI`` is set (CI sets it): 20 derandomized
  examples, as every CPU run did before the quick profile existed;
- ``gpu``, the default with a GPU: 200 random examples.
The quick profile also skips the tests marked ``slow`` (torch.compile parity, opcheck in
bf16/fp16, the bf16 training curve); the other profiles run them.

``FLASH_SAE_TUNING="key=value,key=value"`` sets entries of the loaded kernel's ``TUNING``
for the whole session (values are Python literals), e.g. ``preacts_gemm=True`` runs
every test with the fused encoder GEMM where it fits.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_local  # noqa: E402

REPO_ID = build_local.repo_id()

_cpu = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("quick", max_examples=3, **_cpu)
settings.register_profile("full", max_examples=20, **_cpu)
settings.register_profile("gpu", max_examples=200, deadline=None)
_default = "gpu" if torch.cuda.is_available() else ("full" if os.environ.get("CI") else "quick")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels_ci: fast subset run by CI and nix's ci-test")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (large shapes)")
    config.addinivalue_line("markers", "slow: skipped by the quick profile only")


def pytest_collection_modifyitems(config, items):
    if settings._current_profile != "quick":
        return
    skip = pytest.mark.skip(reason="slow; the quick profile skips it (HYPOTHESIS_PROFILE=full and CI run it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fs():
    """The flash-sae module, loaded through kernels.get_kernel (with ``FLASH_SAE_TUNING`` applied)."""
    module = build_local.load_kernel()
    build_local.apply_tuning(module, os.environ.get("FLASH_SAE_TUNING", ""))
    return module


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
