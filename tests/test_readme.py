"""The README's quickstart runs as written.

The first ``python`` block under the README's "## Quickstart" heading is run in a fresh Python
process from the checkout's root, as a user would paste it there: on the GPU when there is one,
otherwise on the CPU with ``TRITON_INTERPRET=1``, so the real Triton kernels run in the
interpreter at the quickstart's own shapes.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def quickstart_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Quickstart\n", 1)
    assert len(section) == 2, "README.md has no '## Quickstart' section"
    body = section[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, "the Quickstart section has no python block"
    return blocks[0]


def test_quickstart_is_short():
    lines = [line for line in quickstart_block().splitlines() if line.strip()]
    assert len(lines) <= 10, f"the quickstart has {len(lines)} lines of Python; keep it to 10"


def test_quickstart_runs_as_written():
    code = quickstart_block()
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels themselves, in the interpreter
    # Fresh process, checkout root as the working directory: `import build_local` finds it there.
    done = subprocess.run(
        [sys.executable, "-"], input=code, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"the quickstart failed:\n{done.stdout}\n{done.stderr}"
    steps = re.findall(r"step (\d+): loss ([-+.\w]+), FVU ([-+.\w]+)", done.stdout)
    assert [int(s[0]) for s in steps] == [0, 1, 2], f"unexpected output:\n{done.stdout}"
    for _, loss, fvu in steps:
        assert math.isfinite(float(loss)) and float(loss) > 0, done.stdout
        assert math.isfinite(float(fvu)) and 0 < float(fvu) < 2, done.stdout
