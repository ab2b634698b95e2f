"""The project's pin sets agree with each other (offline).

``.ci/check_pins.py`` resolves each set for a Linux x86-64 GPU machine in CI (that needs the
network); this test checks, without it, that every set pins torch, triton and kernels to the
same versions as requirements.txt, so one cannot drift from the others.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ("torch", "triton", "kernels")


def _check_pins():
    spec = importlib.util.spec_from_file_location("check_pins", ROOT / ".ci" / "check_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(lines) -> dict[str, set[str]]:
    pins = {}
    for line in lines:
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if match:
            pins.setdefault(match[1].lower(), set()).add(match[3])
    return pins


def _runtime() -> dict[str, set[str]]:
    pins = _pins((ROOT / "requirements.txt").read_text().splitlines())
    assert set(CORE) <= set(pins), f"requirements.txt must pin {CORE}"
    return {name: pins[name] for name in CORE}


@pytest.mark.kernels_ci
def test_tests_requirements_build_on_the_runtime_set():
    lines = (ROOT / "tests" / "requirements.txt").read_text().splitlines()
    assert "-r ../requirements.txt" in lines
    pins = _pins(lines)
    runtime = _runtime()
    for name in CORE:
        assert pins.get(name, runtime[name]) == runtime[name], f"tests/requirements.txt pins {name} differently"


@pytest.mark.parametrize("script", ["example.py", "examples/train_sae.py", "examples/train_sharded.py"])
def test_script_headers_pin_the_runtime_versions(script):
    deps = _check_pins().script_dependencies(ROOT / script)
    assert deps is not None, f"{script} has no PEP 723 header"
    pins = _pins(deps)
    runtime = _runtime()
    for name in CORE:
        assert pins.get(name) == runtime[name], f"{script}: {name} {pins.get(name)}, requirements.txt {runtime[name]}"


def test_header_parser_reads_a_pep723_block(tmp_path):
    script = tmp_path / "s.py"
    header = '# /// script\n# requires-python = ">=3.11"\n# dependencies = [\n#   "a==1",\n#\n#   "b>=2",\n# ]\n# ///\n'
    script.write_text(header + "x = 1\n")
    assert _check_pins().script_dependencies(script) == ["a==1", "b>=2"]
    (tmp_path / "t.py").write_text("x = 1\n")
    assert _check_pins().script_dependencies(tmp_path / "t.py") is None
