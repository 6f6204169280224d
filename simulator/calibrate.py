"""Fit a CostModel from measured steps: a profiling grid's Parquet or real runs' steps.parquet (same columns)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simulator.calibration_quality import assess
from simulator.cost_model import (
    DEFAULT_KNOTS,
    FEATURE_COLUMNS,
    HOST_TERMS,
    CostModel,
    design_matrix,
    term_blocks,
    term_names,
)
from simulator.nonnegative_least_squares import nonnegative_least_squares

REQUIRED_COLUMNS = (*FEATURE_COLUMNS, "duration")


@dataclass(frozen=True, slots=True)
class Calibration:
    """A fitted cost model and how well it predicts steps it was not fitted on."""

    cost_model: CostModel
    heldout_mape: float
    """Mean absolute percentage error on held-out steps, as a fraction (0.03 = 3%)."""
    heldout_mape_by_kind: dict[str, float]
    num_train: int
    num_heldout: int


def step_kinds(columns: dict) -> np.ndarray:
    """'decode', 'prefill' or 'mixed' for each step."""
    prefill = np.asarray(columns["num_prefill_seqs"]) > 0
    decode = np.asarray(columns["num_decode_seqs"]) > 0
    return np.where(prefill & decode, "mixed", np.where(prefill, "prefill", "decode"))


def mape(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Mean absolute percentage error as a fraction."""
    return float(np.mean(np.abs(predicted - measured) / measured)) if len(measured) else float("nan")


def _metadata(table: pa.Table) -> dict:
    raw = table.schema.metadata or {}
    return {key.decode(): value.decode() for key, value in raw.items() if not key.startswith(b"ARROW")}


ENGINE_OVERHEAD_KEYS = ("engine_step_s", "engine_per_seq_s", "engine_per_prefill_token_s")


def step_columns(table: pa.Table, source: str) -> dict:
    """The cost model's input columns and duration as a real run records it.

    A real run's step lasts from its start to the next step's start, so it includes the engine's
    scheduling and bookkeeping. A profile times only the executor and stores the engine's CPU time
    (measured on the same host) in its metadata; it is added here so both sources mean the same thing.
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"{source}: missing step columns {', '.join(missing)}")
    columns = {name: table.column(name).to_numpy(zero_copy_only=False).astype(np.float64) for name in REQUIRED_COLUMNS}
    metadata = _metadata(table)
    if all(key in metadata for key in ENGINE_OVERHEAD_KEYS):
        # A profile: its grid rows timed the executor alone; rows of its serving phase are engine steps.
        grid = table.column("grid").to_pylist() if "grid" in table.column_names else [None] * table.num_rows
        serving = np.array([name == "serving" for name in grid], dtype=np.float64)
        step_s, per_seq_s, per_token_s = (float(metadata[key]) for key in ENGINE_OVERHEAD_KEYS)
        num_seqs = columns["num_prefill_seqs"] + columns["num_decode_seqs"]
        engine_s = step_s + per_seq_s * num_seqs + per_token_s * columns["num_prefill_tokens"]
        columns["duration"] = columns["duration"] + engine_s * (1.0 - serving)
    else:
        serving = np.ones(table.num_rows)  # a real run's steps
    columns["serving"] = serving
    return columns


def fit_profile_table(table: pa.Table, *, source: str = "profile", **overrides) -> Calibration:
    """Fit from a profiling table as profile() returns it, taking gpu/model/tp/dtype from its metadata."""
    metadata = _metadata(table)
    settings = {
        "gpu": metadata.get("gpu"),
        "model": metadata.get("model"),
        "tp": int(metadata.get("tp", 1)),
        "dtype": metadata.get("dtype", "bfloat16"),
    }
    settings.update(overrides)
    if not settings["gpu"] or not settings["model"]:
        raise ValueError(f"{source}: no gpu/model in the Parquet metadata; pass gpu= and model=")
    return fit(step_columns(table, source), source=source, **settings)


def read_steps(paths) -> tuple[dict, dict]:
    """Concatenated step columns from Parquet files or run folders (steps.parquet inside), and the first file's metadata."""
    parts, metadata = [], {}
    for path in [Path(p) for p in paths]:
        file = path / "steps.parquet" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no such Parquet file or run folder with steps.parquet")
        table = pq.read_table(file)
        parts.append(step_columns(table, str(file)))
        metadata = metadata or _metadata(table)
    return {name: np.concatenate([part[name] for part in parts]) for name in (*REQUIRED_COLUMNS, "serving")}, metadata


def usable_steps(columns: dict) -> np.ndarray:
    """Steps with a batch and a positive, finite measured duration."""
    duration = columns["duration"]
    return np.isfinite(duration) & (duration > 0) & (columns["num_batched_tokens"] > 0)


def _relative_nnls(matrix: np.ndarray, duration: np.ndarray) -> np.ndarray:
    # Dividing each row by its duration makes the squared error relative, which is what MAPE scores.
    return nonnegative_least_squares(matrix / duration[:, None], np.ones(len(duration)))


def _relative_loss(predicted: np.ndarray, duration: np.ndarray) -> float:
    return float(np.mean(((predicted - duration) / duration) ** 2))


def fit_terms(columns: dict, knots, *, overlap_starts: int = 6, max_rounds: int = 20) -> tuple[dict, bool]:
    """Coefficients (all >= 0) right on average over the steps, and whether eager launches overlap GPU work.

    The additive model is one NNLS fit. The overlap model, host + max(launch, gpu) on eager steps, is
    piecewise linear: starting from several guesses of the launch time, alternate between deciding which
    eager steps are launch-bound and refitting both pieces, until the split stops changing. The better of
    the two (by relative squared error) wins, and is refitted to be right on average (_refit_on_average).
    """
    duration = np.asarray(columns["duration"], dtype=np.float64)
    names = term_names(knots)
    num_host = len(HOST_TERMS)

    def loss_of(coefficients: np.ndarray, overlap: bool) -> float:
        model = CostModel("fit", "fit", 1, "fit", dict(zip(names, coefficients.tolist())), knots, eager_overlap=overlap)
        return _relative_loss(model.predict_columns(columns), duration)

    best = _relative_nnls(design_matrix(columns, knots), duration)
    best_overlap = False
    best_loss = loss_of(best, False)
    _, eager, gpu_columns = term_blocks(columns, knots)
    if eager.sum() >= 10:
        additive_gpu = gpu_columns[eager] @ best[num_host + 1 :]
        guesses = np.quantile(additive_gpu, np.linspace(0.1, 0.9, overlap_starts))
        for launch in [best[num_host] + 0.0, *guesses]:
            launch_bound = np.zeros(len(duration), dtype=bool)
            launch_bound[eager] = additive_gpu < launch
            for _ in range(max_rounds):
                coefficients = _relative_nnls(design_matrix(columns, knots, launch_bound), duration)
                gpu_seconds = gpu_columns @ coefficients[num_host + 1 :]
                split = eager & (gpu_seconds < coefficients[num_host])
                if np.array_equal(split, launch_bound):
                    break
                launch_bound = split
            loss = loss_of(coefficients, True)
            if loss < best_loss:
                best, best_overlap, best_loss = coefficients, True, loss
    best = _refit_on_average(columns, knots, best, best_overlap, duration)
    return dict(zip(names, best.tolist())), best_overlap


def _refit_on_average(
    columns: dict, knots, coefficients: np.ndarray, overlap: bool, duration: np.ndarray, rounds: int = 8,
    wild: float = 10.0,
) -> np.ndarray:
    """Refit so that the predictions are right on average, leaving out only wild steps.

    Squared error relative to the measured duration (the first fit) favours predicting low: a step measured
    longer than its prediction counts less than one measured shorter. A serving run's time is the sum of its
    steps, so this refit divides each row by its prediction instead (iterated; variance proportional to
    the mean squared), whose errors average to zero. Steps taking more than `wild` times their prediction (a
    kernel compiled, the machine stalled) get no weight; every other step counts, the occasional slow one
    (a garbage collection: 2-4x the step) included, since a real run has those too. The piece each eager
    step falls on (launch-bound or not) is kept from the first fit.
    """
    num_host = len(HOST_TERMS)
    if overlap:
        _, eager, gpu_columns = term_blocks(columns, knots)
        matrix = design_matrix(columns, knots, eager & (gpu_columns @ coefficients[num_host + 1 :] < coefficients[num_host]))
    else:
        matrix = design_matrix(columns, knots)
    current = coefficients
    for _ in range(rounds):
        predicted = matrix @ current
        # A row predicted at 0 cannot scale its error (the first fit gives each step a host time, so none is).
        kept = (predicted > 0) & (duration <= wild * predicted)
        if kept.sum() < matrix.shape[1]:
            break  # too few rows left to pin every term: keep the last fit
        current = nonnegative_least_squares(matrix[kept] / predicted[kept, None], duration[kept] / predicted[kept])
    return current


def fit(
    columns: dict,
    *,
    gpu: str,
    model: str,
    tp: int = 1,
    dtype: str = "bfloat16",
    knots=None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    source: str = "",
) -> Calibration:
    """Fit on all usable steps; held-out MAPE comes from a fit without a random holdout_fraction of them."""
    serving = columns.get("serving")
    columns = {name: np.asarray(columns[name], dtype=np.float64) for name in REQUIRED_COLUMNS}
    columns["serving"] = np.ones(len(columns["duration"])) if serving is None else np.asarray(serving, np.float64)
    usable = np.flatnonzero(usable_steps(columns))
    if len(usable) < 20:
        raise ValueError(f"{source or 'calibration data'}: only {len(usable)} usable steps; need at least 20")
    graph = columns["cuda_graph_batch_size"]
    tokens = np.where(graph > 0, graph, columns["num_batched_tokens"])[usable]
    if knots is None:
        # A hinge needs steps beyond it to be fitted; knots past the data would be unconstrained.
        knots = tuple(k for k in DEFAULT_KNOTS if np.count_nonzero(tokens > k) >= 3)
    knots = tuple(int(k) for k in knots)

    def rows(selection: np.ndarray) -> dict:
        return {name: values[selection] for name, values in columns.items()}

    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(usable)
    num_heldout = int(round(len(usable) * holdout_fraction))
    heldout, train = shuffled[:num_heldout], shuffled[num_heldout:]
    kinds = step_kinds(columns)
    heldout_mape, heldout_median, by_kind = float("nan"), float("nan"), {}
    if num_heldout:
        coefficients, overlap = fit_terms(rows(train), knots)
        trial = CostModel(gpu, model, tp, dtype, coefficients, knots, eager_overlap=overlap)
        predicted = trial.predict_columns(rows(heldout))
        measured = columns["duration"][heldout]
        heldout_mape = mape(predicted, measured)
        # The median shows the typical step when a loaded host leaves a few wild ones in the mean.
        heldout_median = float(np.median(np.abs(predicted - measured) / measured))
        for kind in ("decode", "prefill", "mixed"):
            mask = kinds[heldout] == kind
            if mask.any():
                by_kind[kind] = mape(predicted[mask], measured[mask])

    coefficients, overlap = fit_terms(rows(usable), knots)
    provisional = CostModel(gpu, model, tp, dtype, coefficients, knots, eager_overlap=overlap)
    train_mape = mape(provisional.predict_columns(rows(usable)), columns["duration"][usable])
    report = {
        "source": source,
        "num_steps": int(len(usable)),
        "num_heldout": int(num_heldout),
        "heldout_mape": round(heldout_mape, 5),
        "heldout_median_ape": round(heldout_median, 5),
        "heldout_mape_by_kind": {kind: round(value, 5) for kind, value in by_kind.items()},
        "train_mape": round(train_mape, 5),
        "num_serving_steps": int(np.count_nonzero(columns["serving"][usable] > 0)),
    }
    report["calibration_quality"] = assess(report)
    cost_model = CostModel(gpu, model, tp, dtype, coefficients, knots, eager_overlap=overlap, fit_report=report)
    return Calibration(cost_model, heldout_mape, by_kind, len(usable) - num_heldout, num_heldout)
