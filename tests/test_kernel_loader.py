"""build_local.load_kernel, the one loader of the tests, benchmarks and example: offline, and when it
cannot load, a message that says what to run (``python build_local.py``, or ``LOCAL_KERNELS``).

Each case runs in a fresh interpreter: the loader reads and sets ``LOCAL_KERNELS``, which the kernels
package parses once per value."""

import os
import subprocess
import sys
from pathlib import Path

import build_local

RID = build_local.repo_id()
ROOT = Path(__file__).resolve().parent.parent
LOAD = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import build_local; m = build_local.load_kernel(); "


def _run(code, local_kernels):
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_KERNELS"}
    env.update(HF_HUB_OFFLINE="1", LOCAL_KERNELS=local_kernels)  # no network: a hub lookup would fail
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_an_unbuilt_local_kernels_folder_says_what_to_run(tmp_path):
    """kernels' own message ends in a colon with nothing after it; the loader's names the folder and the fix."""
    out = _run(LOAD, f"{RID}={tmp_path}")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError: Cannot find a build variant"), out.stderr[-2000:]
    assert str(tmp_path) in last and "python build_local.py" in last and "LOCAL_KERNELS=" in last
    assert not last.rstrip().endswith(":")


def test_local_kernels_for_other_kernels_gets_this_checkout_appended(tmp_path):
    """A LOCAL_KERNELS that maps only other kernels used to send get_kernel to the hub (a connection
    error offline): the loader builds this checkout and appends its entry, keeping the others."""
    other = f"someone/other-kernel={tmp_path}"
    code = LOAD + "import os; print(os.environ['LOCAL_KERNELS']); print(hasattr(m, 'SparseAutoencoder'))"
    out = _run(code, other)
    assert out.returncode == 0, out.stderr[-3000:]
    env_line, ok = out.stdout.strip().splitlines()[-2:]
    assert env_line == f"{other}:{RID}={ROOT}" and ok == "True"
