"""Test session set-up: load flash-sae exactly as a user does, through the kernel hub.

Without a GPU the real Triton kernels run under ``TRITON_INTERPRET=1``, which
must be set before the package's kernels are decorated, so it is set here,
before the kernel is loaded. ``build_local.load_kernel`` (the one loader the
tests, benchmarks and example share) builds the noarch variants and loads
them with ``get_kernel(<repo id from build.toml>, version=1)`` through
``LOCAL_KERNELS``, unless ``LOCAL_KERNELS`` already points at a build (nix's
ci-test sets it).

Tiers
-----
``python -m pytest tests`` runs the FAST tier; ``python -m pytest tests --full``
runs the FULL tier, which is what CI runs (README's test command). Both cover
every op and module; they differ in how many examples each property test draws
and in the tests marked ``slow``:

- FAST (the default): the Hypothesis profile ``fast`` on a CPU (2 derandomized
  examples per property test) or ``gpu-fast`` on a GPU (10 random examples).
  Tests and parametrizations marked ``slow`` are skipped: torch.compile parity,
  opcheck in bf16/fp16, the bf16 training curve, and the extra shapes and
  dtypes of the heaviest parametrized tests (one case of each stays). Aim:
  under 10 minutes on an idle 2-core CPU and on one H100.
- FULL (``--full``): the profile ``full`` on a CPU (20 derandomized examples)
  or ``gpu`` on a GPU (200 random examples), and every test.

Every property test that checks parity also pins ``@example``s (one per dtype:
fp32, bf16, fp16; and one with duplicate latents where the op takes a given
code) at small shapes, so every tier runs each dtype whatever the draw.

``HYPOTHESIS_PROFILE`` still picks a profile by name and wins over the tier's
(``quick``, the former CPU default of 3 examples, is kept); ``HYPOTHESIS_PROFILE=full``
or ``gpu`` also runs the ``slow`` tests, as ``--full`` does. The profile
``examples`` runs each property test's pinned ``@example``s alone, no draws.

Shrinking: under ``--full`` or when ``CI`` is set, Hypothesis does not shrink a
failing example (the ``shrink`` and ``explain`` phases are off; a failing
property test once spent over five minutes shrinking, twice in one run). A
failure then reports the first failing example exactly as drawn ("Falsifying
example: test_x(shape=(...), dtype=..., seed=...)") with its traceback; it is
not minimal, but the CPU profiles are derandomized, so the same command draws
it again, and the GPU profiles print the ``@reproduce_failure`` blob that
replays it. To shrink it, paste it as an ``@example`` or rerun the test locally
without ``CI`` (the fast tier shrinks, bounded by Hypothesis's own limits).

``-m kernels_ci`` selects the subset the kernel hub's quick check runs (under
60 s on a 2-core CPU): one test of each op and module at a tiny shape, and the
packaging tests. It is a marker only: the tier and profile are chosen as above.

Peer packages (SAELens, sparsify, transformers...) are imported only through
``peers.require``, which skips a test without them locally and fails it when
``CI`` is set.

``FLASH_SAE_TUNING="key=value,key=value"`` sets entries of the loaded kernel's ``TUNING``
for the whole session (values are Python literals), e.g. ``preacts_gemm=True`` runs
every test with the fused encoder GEMM where it fits.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_local  # noqa: E402

REPO_ID = build_local.repo_id()

_NO_SHRINK = tuple(p for p in Phase if p not in (Phase.shrink, Phase.explain))
_SHRINK = tuple(Phase) if not os.environ.get("CI") else _NO_SHRINK
_cpu = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
_gpu = dict(deadline=None, print_blob=True)
settings.register_profile("fast", max_examples=2, phases=_SHRINK, **_cpu)
settings.register_profile("quick", max_examples=3, phases=_SHRINK, **_cpu)  # the former CPU default
settings.register_profile("full", max_examples=20, phases=_NO_SHRINK, **_cpu)
settings.register_profile("gpu-fast", max_examples=10, phases=_SHRINK, **_gpu)
settings.register_profile("gpu", max_examples=200, phases=_NO_SHRINK, **_gpu)
settings.register_profile("examples", phases=(Phase.explicit,), **_cpu)  # the pinned @examples alone
FULL_PROFILES = ("full", "gpu")


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="the full tier (what CI runs): 20 examples per property test on a CPU, 200 on a GPU, the slow tests too",
    )


def full_tier(config) -> bool:
    return bool(config.getoption("--full")) or os.environ.get("HYPOTHESIS_PROFILE") in FULL_PROFILES


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels_ci: the kernel hub's quick check (pytest -m kernels_ci), under 60 s")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (large shapes)")
    config.addinivalue_line("markers", "slow: runs in the full tier only (--full); the fast tier skips it")
    # Loaded here, before collection: the test modules' @settings take the profile's values.
    gpu = torch.cuda.is_available()
    if full_tier(config):
        default = "gpu" if gpu else "full"
    else:
        default = "gpu-fast" if gpu else "fast"
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", default))


def pytest_report_header(config):
    tier = "full (--full)" if full_tier(config) else "fast (the default; --full runs the full tier)"
    return f"flash-sae test tier: {tier}; hypothesis profile: {settings._current_profile}"


def pytest_collection_modifyitems(config, items):
    if full_tier(config):
        return
    skip = pytest.mark.skip(reason="slow: the full tier runs it (python -m pytest tests --full)")
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
