"""Packaging: build.toml, the flake, the hub layout rules, and the built variant loading offline."""

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "torch-ext" / "flash_sae"
ALLOWED_IMPORTS = {"torch", "triton"} | set(sys.stdlib_module_names)


def _sources():
    return sorted(p for p in PKG.rglob("*.py") if p.name != "_ops.py")


@pytest.mark.kernels_ci
def test_build_toml_parses_with_kernels_parser():
    from kernels._rust import Build

    Build.open(str(ROOT))  # raises on anything kernel-builder would reject
    general = tomllib.loads((ROOT / "build.toml").read_text())["general"]
    assert general["name"] == "flash-sae" and general["version"] == 1 and general["edition"] == 5
    assert general["license"] == "Apache-2.0"
    assert {"cpu", "cuda"} <= set(general["backends"])
    assert general["hub"]["repo-id"] == "org/flash-sae"


@pytest.mark.kernels_ci
def test_flake_parses():
    nix = shutil.which("nix-instantiate")
    if nix is None:
        if os.environ.get("CI"):
            pytest.fail("nix-instantiate missing: .ci/run installs Debian's nix-bin")
        pytest.skip("nix-instantiate not installed (Debian package nix-bin)")
    out = subprocess.run([nix, "--parse", str(ROOT / "flake.nix")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "genKernelFlakeOutputs" in out.stdout and "hypothesis" in out.stdout


@pytest.mark.kernels_ci
def test_layout_rules():
    assert (PKG / "__init__.py").exists()
    tracked = subprocess.run(["git", "ls-files", "torch-ext"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "_ops.py" not in tracked, "_ops.py is generated at build time and must not be committed"
    for path in _sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in ALLOWED_IMPORTS, f"{path.name}: import {alias.name}"
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in ALLOWED_IMPORTS, f"{path.name}: from {node.module}"


# The ops flash-sae registers, by public name; each also registers "<name>_backward".
OPS = (
    "batchtopk_encode",
    "batchtopk_sae_step",
    "gated_sae_step",
    "hierarchical_topk_sae_loss",
    "jumprelu_encode",
    "jumprelu_sae_step",
    "sparse_decode",
    "standard_sae_step",
    "topk_encode",
    "topk_sae_loss",
    "topk_sae_step",
    "varlen_sae_loss",
    "varlen_sparse_decode",
)
# Registered variants of a public op, in that op's file (none: a dead-latent loss, AuxK or ghost grads, and
# Matryoshka's levels are optional parts of their selection rule's step op, not twin ops).
VARIANTS = {}


@pytest.mark.kernels_ci
def test_ops_are_named_through_the_namespace_prefix():
    """kernel-builder's AST check: every registration names its op via add_op_namespace_prefix.
    Registration happens in one place, the helper in _registry.py, for the forward and the backward."""
    files = _sources() + sorted((ROOT / "tests").glob("*.py"))
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"custom_op", "triton_op"}:
                found.append(path.relative_to(PKG).as_posix() if PKG in path.parents else path.name)
                arg = node.args[0]
                assert isinstance(arg, ast.Call) and getattr(arg.func, "id", "") == "add_op_namespace_prefix", (
                    f"{path.name}:{node.lineno} names an op without add_op_namespace_prefix"
                )
    assert found == ["_registry.py", "_registry.py"], found


@pytest.mark.kernels_ci
def test_registered_ops_are_exactly_the_public_ones(fs):
    """The build's op namespace holds exactly each public op, its variants and their backwards: nothing
    missing, nothing extra; a variant is registered in its public op's file."""
    import torch

    namespace = sys.modules[fs.__name__ + "._ops"].add_op_namespace_prefix("x").split("::")[0]
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith(namespace + "::")}
    assert registered == {name + suffix for name in (*OPS, *VARIANTS) for suffix in ("", "_backward")}
    for variant, public in VARIANTS.items():
        module = sys.modules[getattr(fs, public).__module__]
        assert getattr(module, "_" + variant).name == variant, f"{variant} is not registered in {public}'s file"
    for name in OPS:
        assert getattr(fs, name).__module__.endswith(name), f"{name} is not defined in a file named for it"


def _package_imports(path):
    """The package-relative modules ``path`` imports, as dotted paths from the package root."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = parts[: len(parts) - node.level]
            module = base + (node.module.split(".") if node.module else [])
            if node.module is None:
                out |= {".".join(module + [alias.name]) for alias in node.names}
            else:
                out.add(".".join(module))
    return out


@pytest.mark.kernels_ci
def test_import_rules():
    """Ops reach kernels through primitives, never through another op (a family's private ``_`` module,
    such as ``ops/decode/_loss.py``, is shared code, not an op); production code never imports the test
    reference (``testing``, which only __init__ imports, outside ``__all__``); primitives import no op or
    module."""
    for path in _sources():
        rel = path.relative_to(PKG).with_suffix("").as_posix().replace("/", ".")
        imports = _package_imports(path)
        if rel != "__init__" and not rel.startswith("testing"):
            assert not {m for m in imports if m.startswith("testing")}, f"{rel} imports the test reference"
        if rel.startswith("ops."):
            others = {m for m in imports if m.startswith("ops.") and m != rel and not m.split(".")[-1].startswith("_")}
            assert not others, f"{rel} imports other ops: {sorted(others)}"
        if rel.startswith("primitives."):
            assert not {m for m in imports if m.startswith(("ops", "modules"))}, f"{rel}: {sorted(imports)}"


@pytest.mark.kernels_ci
def test_public_api(fs):
    """``__all__``: the names below and every registered architecture's module (a new architecture's module is
    exported with its registration)."""
    modules = [arch.module.__name__ for arch in fs.ARCHITECTURES.values()]
    assert sorted(fs.__all__) == sorted(
        modules
        + [
            "ARCHITECTURES",
            "Architecture",
            "BatchTopKCrosscoderStep",
            "BatchTopKSAEStep",
            "CrossLayerTranscoderStep",
            "CrosscoderLayers",
            "DeadLatentLoss",
            "FusedAdam",
            "GatedSAEStep",
            "Hook",
            "HookSession",
            "JumpReLUCrosscoderStep",
            "JumpReLUSAEStep",
            "LatentAnalysis",
            "LatentStatistics",
            "MatryoshkaSAEStep",
            "STEP_FIELDS",
            "SparseCode",
            "StandardCrosscoderStep",
            "StandardSAEStep",
            "TopKCrosscoderStep",
            "TopKSAEStep",
            "attach",
            "batchtopk_encode",
            "batchtopk_sae_step",
            "circuit_tracer_transcoder_set",
            "distributed",
            "gated_sae_step",
            "gated_sae_step_dense",
            "graph_training_step",
            "hierarchical_topk_sae_loss",
            "jumprelu_encode",
            "jumprelu_sae_step",
            "layers",
            "load_circuit_tracer",
            "load_gemma_scope",
            "load_saelens",
            "load_sparsify",
            "matryoshka_batchtopk_sae_step",
            "matryoshka_topk_sae_step",
            "register_architecture",
            "sparse_decode",
            "standard_sae_step",
            "standard_sae_step_dense",
            "topk_encode",
            "topk_sae_loss",
            "topk_sae_step",
            "varlen_sae_loss",
            "varlen_sparse_decode",
        ]
    )
    for name in fs.__all__:
        assert getattr(fs, name).__doc__, f"{name} has no docstring"


@pytest.mark.kernels_ci
def test_local_build_loads_with_get_local_kernel(tmp_path):
    """build_local.py writes valid noarch variants that get_local_kernel imports (no GPU needed)."""
    from kernels import get_local_kernel
    from kernels._rust import Metadata

    subprocess.run([sys.executable, str(ROOT / "build_local.py"), "--out", str(tmp_path / "build")], check=True)
    general = tomllib.loads((ROOT / "build.toml").read_text())["general"]
    ids = set()
    for backend in general["backends"]:
        variant = tmp_path / "build" / f"torch-{backend}"
        meta = json.loads((variant / "metadata.json").read_text())
        assert {"name", "id", "version", "license", "python-depends", "backend"} <= set(meta)
        assert meta["backend"] == {"type": backend} and meta["version"] == 1
        assert Metadata.read_from_file(variant / "metadata.json").name.python_name == "flash_sae"
        assert (variant / "_ops.py").exists() and (variant / "__init__.py").exists()
        ids.add(meta["id"])
    assert len(ids) == len(general["backends"])
    module = get_local_kernel(tmp_path / "build")
    assert module.__name__.startswith("_flash_sae_") and callable(module.topk_sae_loss)
    assert callable(module.testing.reference.topk_sae_loss) and callable(module.SparseAutoencoder)  # subpackages copied
    ops = sys.modules[module.__name__ + "._ops"]
    namespace = ops.add_op_namespace_prefix("x").split("::")[0]
    assert namespace.startswith("_flash_sae_")


@pytest.mark.kernels_ci
def test_every_result_log_is_cited():
    """benchmarks/results/logs/ holds the logs a claim cites, nothing else: each is named in README.md, the
    docs or benchmarks/results/README.md (the JSONL results are the report's input; test_results.py checks
    them)."""
    text = (ROOT / "README.md").read_text() + (ROOT / "benchmarks" / "results" / "README.md").read_text()
    text += "".join(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))
    logs = sorted((ROOT / "benchmarks" / "results" / "logs").iterdir())
    uncited = [p.name for p in logs if p.name not in text]
    assert logs and not uncited, f"logs in benchmarks/results/logs/ that nothing cites: {uncited}"


@pytest.mark.kernels_ci
def test_missing_local_build_says_how_to_build(tmp_path, monkeypatch):
    """LOCAL_KERNELS pointing at a folder with no build fails with a hint to run build_local.py."""
    import build_local

    monkeypatch.setenv("LOCAL_KERNELS", f"{build_local.repo_id()}={tmp_path}")
    with pytest.raises(FileNotFoundError, match="run `python build_local.py` in that checkout"):
        build_local.load_kernel()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_entry=1", "no TUNING entry 'no_such_entry'"),
        ("preacts_gemm", "is not key=value"),
        ("preacts_gemm=maybe", "is not a Python literal"),
        ("preacts_gemm=(1,", "is not a Python literal"),
    ],
)
def test_apply_tuning_rejects_bad_specs(fs, spec, message):
    """A malformed FLASH_SAE_TUNING / --tuning spec raises ValueError naming its source and changes
    nothing, even when an earlier item in the spec was good."""
    import build_local

    table = sys.modules[fs.__name__ + "._launch"].TUNING
    before = dict(table)
    with pytest.raises(ValueError, match=rf"^--tuning: .*{message}"):
        build_local.apply_tuning(fs, f"preacts_gemm={not table['preacts_gemm']},{spec}", where="--tuning")
    assert table == before


def test_apply_tuning_sets_entries(fs):
    import build_local

    table = sys.modules[fs.__name__ + "._launch"].TUNING
    before = dict(table)
    try:
        build_local.apply_tuning(fs, f" preacts_gemm = {not before['preacts_gemm']} ,")
        assert table == {**before, "preacts_gemm": not before["preacts_gemm"]}
    finally:
        table.clear()
        table.update(before)
