"""One schema for every benchmark result row.

Every row is one JSON object on its own line (JSONL) in
``benchmarks/results/<gpu slug>/<benchmark>.jsonl``, for example
``benchmarks/results/h100/side_by_side_step.jsonl``.

Required fields (``None``/null where not measured or not recorded):

- ``benchmark``       str: the benchmark's name, which is also the file's stem
- ``implementation``  str: what was timed ("flash-sae", "torch.compile (dense)", "sparsify (installed)", ...)
- ``shape``           dict of str -> int: B, D, F, K where they apply, plus any other named dims
- ``dtype``           str or None
- ``eager_ms``        number or None: launched from Python each step (median)
- ``graph_ms``        number or None: replayed from a CUDA graph (GPU time)
- ``peak_gib``        number or None: peak memory above the inputs
- ``gpu``             str: the device name as torch reports it, "cpu" for the CPU
- ``torch``, ``triton``, ``commit``, ``date``   str or None

Optional fields: the named metrics in ``OPTIONAL_METRICS`` (number or None), the yes/no
outcomes in ``OPTIONAL_FLAGS`` (bool or None), ``params`` (a dict
of str -> scalar: the settings a row was measured under that are not dims, e.g. the op, the
learning rate, the target L0), ``error`` (str or None: why a cell has no time, e.g. out of
memory) and ``note`` (str). Any other key is an error, so a typo cannot slip through.

NaN is not valid JSON: ``make_row`` turns NaN into None.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

REQUIRED = (
    "benchmark",
    "implementation",
    "shape",
    "dtype",
    "eager_ms",
    "graph_ms",
    "peak_gib",
    "gpu",
    "torch",
    "triton",
    "commit",
    "date",
)

OPTIONAL_METRICS = (
    # timing spread and floors
    "eager_p20_ms",
    "eager_p80_ms",
    "floor_ms",
    "pct_of_floor",
    "gemm_ms",
    "x_gemm",
    "x_baseline_eager",
    "x_baseline_graph",
    "copy_bandwidth_tbps",
    # memory: what a step keeps from its forward for its backward, beside one dense [B, L * F] code
    "saved_gib",
    "dense_code_gib",
    # training loops
    "tokens_per_s",
    "ms_per_step",
    "touched_rows",  # the share of latent rows a step gave a gradient (a lazy optimizer's work)
    "wall_s",
    "steps",
    "tokens",
    "loss",
    "fvu",
    "explained_variance",
    "l0",
    "dead_fraction",
    "lr",
    # sharded step
    "adam_ms",
    "collectives_ms",
    "memory_target_gib",
    "single_gpu_topk_sae_step_ms",
    # standard / gated steps
    "density",
    # precision and bounds
    "error_bf16_buffer",
    "error_fp32_buffer",
    "error_ratio",
    "error_torch_bf16",
    "max_error_over_bound",
    "bound_over_spread",
    "candidates_median",
    "candidates_max",
    "rows_settled_at_4k",
    "rows",
    # kernel-level timings: tune.py's sweeps, fp8_prune_bound's GEMMs
    "ms",
    "quantize_w_ms",
)

# outcomes that are yes/no (bool or None)
OPTIONAL_FLAGS = ("bound_holds", "exact_topk_in_candidates", "verified")

OPTIONAL_OTHER = ("params", "error", "note")

_NUMBER = (int, float)
_STR_FIELDS = ("dtype", "torch", "triton", "commit", "date")


def gpu_slug(gpu: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200', 'cpu' -> 'cpu'."""
    name = gpu.lower()
    if name == "cpu":
        return "cpu"
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name.replace("nvidia", ""))
    if m:
        return m.group(1)
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "unknown"


def result_path(gpu: str, benchmark: str, root: Path = RESULTS_DIR) -> Path:
    return Path(root) / gpu_slug(gpu) / f"{benchmark}.jsonl"


def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def make_row(benchmark: str, implementation: str, shape: dict, *, env: dict, dtype=None, params=None, **fields) -> dict:
    """Builds one validated row. ``env`` holds gpu, torch, triton, commit, date (see ``environment``);
    ``fields``: the timings ``eager_ms``, ``graph_ms``, ``peak_gib``, an ``error`` or a ``note``, and
    the benchmark's own metrics (any other name)."""
    eager_ms, graph_ms, peak_gib = (fields.pop(k, None) for k in ("eager_ms", "graph_ms", "peak_gib"))
    error, note, metrics = fields.pop("error", None), fields.pop("note", None), fields
    row = dict(
        benchmark=benchmark,
        implementation=implementation,
        shape={k: int(v) for k, v in shape.items() if v is not None},
        dtype=dtype,
        eager_ms=_clean(eager_ms),
        graph_ms=_clean(graph_ms),
        peak_gib=_clean(peak_gib),
        gpu=env["gpu"],
        torch=env.get("torch"),
        triton=env.get("triton"),
        commit=env.get("commit"),
        date=env.get("date"),
    )
    for k, v in metrics.items():
        row[k] = _clean(v)
    if params:
        row["params"] = {k: _clean(v) for k, v in params.items()}
    if error is not None:
        row["error"] = str(error)
    if note is not None:
        row["note"] = note
    validate_row(row)
    return row


def validate_row(row: dict) -> None:
    """Raises ValueError naming the first problem; returns None for a valid row."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise ValueError(f"row lacks {missing}: {row}")
    known = set(REQUIRED) | set(OPTIONAL_METRICS) | set(OPTIONAL_FLAGS) | set(OPTIONAL_OTHER)
    unknown = [k for k in row if k not in known]
    if unknown:
        raise ValueError(f"row has unknown fields {unknown} (add them to OPTIONAL_METRICS?): {row}")
    for k in ("benchmark", "implementation", "gpu"):
        if not isinstance(row[k], str) or not row[k]:
            raise ValueError(f"{k} must be a non-empty string: {row}")
    if not re.fullmatch(r"[a-z0-9_]+", row["benchmark"]):
        raise ValueError(f"benchmark must be a lower-case file stem: {row['benchmark']!r}")
    shape = row["shape"]
    if not isinstance(shape, dict) or not shape:
        raise ValueError(f"shape must be a non-empty object: {row}")
    for k, v in shape.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"shape[{k!r}] must be an int: {row}")
    for k in _STR_FIELDS:
        if row[k] is not None and not isinstance(row[k], str):
            raise ValueError(f"{k} must be a string or null: {row}")
    if row["date"] is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date"]):
        raise ValueError(f"date must be YYYY-MM-DD: {row['date']!r}")
    for k in ("eager_ms", "graph_ms", "peak_gib") + OPTIONAL_METRICS:
        v = row.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, _NUMBER) or (isinstance(v, float) and not math.isfinite(v)):
            raise ValueError(f"{k} must be a finite number or null: {row}")
    for k in OPTIONAL_FLAGS:
        if row.get(k) is not None and not isinstance(row[k], bool):
            raise ValueError(f"{k} must be true, false or null: {row}")
    params = row.get("params")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"params must be an object: {row}")
        for k, v in params.items():
            if not isinstance(v, (str, int, float, bool, type(None))):
                raise ValueError(f"params[{k!r}] must be a scalar: {row}")
    for k in ("error", "note"):
        if row.get(k) is not None and not isinstance(row[k], str):
            raise ValueError(f"{k} must be a string: {row}")


def append_rows(path, rows) -> Path:
    """Validates every row, then appends them to the JSONL file at ``path`` (created with its folder)."""
    rows = list(rows)
    for r in rows:
        validate_row(r)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r, allow_nan=False) + "\n")
    return path


def write_rows(path, rows) -> Path:
    """Like ``append_rows``, but replaces the file: one benchmark run per file."""
    path = Path(path)
    if path.exists():
        path.unlink()
    return append_rows(path, rows)


def read_rows(path) -> list[dict]:
    """Reads and validates every row of a JSONL file."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            validate_row(row)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        rows.append(row)
    return rows


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device=None) -> dict:
    """gpu, torch, triton, commit and today's UTC date for the rows of this run."""
    env = dict(
        gpu="cpu", torch=None, triton=None, commit=git_commit(), date=datetime.now(timezone.utc).strftime("%Y-%m-%d")
    )
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
            env["gpu"] = torch.cuda.get_device_name(device)
    except ImportError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env
