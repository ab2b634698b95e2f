#!/usr/bin/env python3
"""Resolves every pin set of the project for a Linux x86-64 GPU machine, as a user's install would.

This CPU machine's package index offers a CPU build of torch that carries no triton requirement,
so an install here proves nothing about a GPU machine, where torch comes from PyPI with its own
pinned triton and CUDA wheels. For each pin set (requirements.txt, tests/requirements.txt,
docs/requirements.txt, and the PEP 723 header of example.py and of every script in examples/):

- ``uv pip compile`` for x86_64-manylinux_2_28 and Python 3.12, with no local configuration: the
  resolver ``uv run`` uses, which also builds the metadata of packages published only as sources;
- ``pip install --dry-run --only-binary=:all: --platform manylinux_*_x86_64 --python-version 3.12
  --target ...`` in isolated mode (no local index), for the sets made only of wheels (the user-facing
  ones); pip needs wheels for a foreign platform.

Exits non-zero, naming the set, if any resolution fails. Needs network access to the package
index, so it runs in CI (``.ci/run``), not in the test suite.
"""

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "3.12"
UV_PLATFORM = "x86_64-manylinux_2_28"
PIP_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 29)] + ["manylinux2014_x86_64"]
# The test set pulls packages published only as sources (through sae-lens), which pip cannot
# resolve for a foreign platform; uv checks it.
UV_ONLY = {"tests/requirements.txt", "docs/requirements.txt"}
# Sets installed with ``pip install --no-deps`` (the file says why): each pin must exist for the
# platform; their own dependencies are not resolved.
NO_DEPS = {"tests/requirements-nodeps.txt"}

_HEADER = re.compile(r"(?m)^# /// script\s*$\n(?P<body>(?:^#(?: .*)?$\n)+?)^# ///\s*$")


def script_dependencies(path: Path) -> list[str] | None:
    """The ``dependencies`` of a PEP 723 ``script`` block, or None if the file has none."""
    match = _HEADER.search(path.read_text(encoding="utf-8"))
    if match is None:
        return None
    body = "".join(line[2:] if line.startswith("# ") else "\n" for line in match["body"].splitlines(True))
    return list(tomllib.loads(body).get("dependencies", []))


def pin_sets(tmp: Path) -> list[tuple[str, Path]]:
    """(name, requirements file) for every pin set; headers are written to files under ``tmp``."""
    sets = []
    for rel in ("requirements.txt", "tests/requirements.txt", "tests/requirements-nodeps.txt", "docs/requirements.txt"):
        if (ROOT / rel).exists():
            sets.append((rel, ROOT / rel))
    for script in [ROOT / "example.py", *sorted((ROOT / "examples").glob("*.py"))]:
        deps = script_dependencies(script)
        if deps is None:
            continue
        rel = str(script.relative_to(ROOT))
        req = tmp / (rel.replace("/", "__") + ".txt")
        req.write_text("\n".join(deps) + "\n")
        sets.append((f"{rel} (PEP 723 header)", req))
    return sets


def run(cmd: list[str], env: dict) -> tuple[bool, str]:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return out.returncode == 0, (out.stdout + out.stderr)[-3000:]


def main() -> int:
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", UV_NO_CONFIG="1")
    failures = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name, req in pin_sets(tmp):
            uv = ["uv", "pip", "compile", "--quiet", "--python-platform", UV_PLATFORM, "--python-version", PYTHON]
            no_deps = ["--no-deps"] if name in NO_DEPS else []
            checks = [("uv", [*uv, *no_deps, str(req), "-o", str(tmp / "resolved.txt")])]
            if name.split(" ")[0] not in UV_ONLY:
                target = tmp / "target"
                pip = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--quiet"]
                pip += ["--ignore-installed", "--only-binary=:all:", "--python-version", PYTHON, *no_deps]
                pip += [arg for plat in PIP_PLATFORMS for arg in ("--platform", plat)]
                checks.append(
                    ("pip", [*pip, "--target", str(target), "--cache-dir", str(tmp / "cache"), "-r", str(req)])
                )
            for tool, cmd in checks:
                ok, log = run(cmd, env)
                print(f"{'ok  ' if ok else 'FAIL'} {tool:3s} {name} (Linux x86-64, Python {PYTHON})", flush=True)
                if not ok:
                    failures.append(name)
                    print(log)
    if failures:
        print(f"{len(failures)} resolution(s) failed: these pins cannot be installed on a Linux GPU machine")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
