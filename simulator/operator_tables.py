"""An operator profile (the table of simulator/operator_profile_schema.py) read into curves and grids of seconds.

The rules, the same for every operator so that any composed prediction can be traced back to profile rows:
- Shape: an operator's rows at exactly the shape asked for (a gemm's n and k, a norm's width, attention heads)
  where measured; else the measured shape nearest in log space (sum over the shape's columns of |log asked/found|,
  ties to the smaller shape), its times scaled by the ratio of the two shapes' sizes (gemm n*k: the weight's bytes
  and the FLOPs per row both grow so; width, or heads x head_dim, for the per-token operators). Columns a kernel
  is compiled for (attention head_dim, the all-reduce's tp) must match exactly.
- Axes (tokens m, message bytes, num_seqs, query_len, context_len): piecewise linear between measured points,
  flat below the first point (a kernel is never cheaper than its smallest measured call), and the last segment
  continued above the last point. Several axes: multilinear on the grid of every axis's measured values, each
  measured line first resampled onto that grid by the same rule.
- Repeated points are averaged, then times are made non-decreasing along each measured line by the nearest
  non-decreasing fit (least squares, pooling adjacent violators) and across lines by a running maximum, so noise
  never makes more work cheaper. A running maximum along a line carried one slow sample to every larger shape:
  the o GEMM of Qwen3-0.6B timed 13 us at 1 and 4 rows, 6 us from 8 rows on, held at 13 us for every decode step
  (+9% on its H200 replays, session 11).
- Kernel times come from the rows timed inside a CUDA graph (graph true) where an operator has any, else from its
  eager rows (which include a launch).
"""

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simulator.operator_profile_schema import FORMAT, OPERATOR_PROFILE_SCHEMA, OPERATORS, VERSION



@dataclass(frozen=True, eq=False)
class OperatorProfile:
    """The rows of an operator profile as numpy columns, with the file's metadata."""

    source: str
    columns: dict[str, np.ndarray] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def gpu(self) -> str:
        """The GPU the operators were timed on, as the profile's metadata names it."""
        return self.metadata.get("gpu") or self.metadata.get("gpu_name") or "unknown"

    @property
    def num_rows(self) -> int:
        return len(self.columns["op"])

    @classmethod
    def read(cls, path: str | Path) -> "OperatorProfile":
        """Read and check a Parquet operator profile (format, version, columns)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"operator profile {path} does not exist")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path}: not a Parquet operator profile ({error})") from None
        metadata = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
        lowered = {key.lower(): value for key, value in metadata.items()}
        if lowered.get("format") != FORMAT:
            raise ValueError(f"{path}: not a twinfer operator profile (metadata 'format' should be {FORMAT!r})")
        if lowered.get("version") != VERSION:
            raise ValueError(f"{path}: operator profile version {lowered.get('version')!r}; this twinfer reads {VERSION}")
        return cls.from_table(table, source=str(path), metadata=metadata)

    @classmethod
    def from_table(cls, table: pa.Table, source: str, metadata: dict | None = None) -> "OperatorProfile":
        """From a table in the schema's columns (missing numeric columns read as 0, as the schema says)."""
        missing = [name for name in ("op", "variant", "dtype", "graph", "seconds") if name not in table.column_names]
        if missing:
            raise ValueError(f"operator profile {source} lacks the column(s) {', '.join(missing)}")
        columns = {}
        for schema_field in OPERATOR_PROFILE_SCHEMA:
            name = schema_field.name
            if name not in table.column_names:
                columns[name] = np.zeros(table.num_rows, dtype=np.int64)
            elif name in ("op", "variant", "dtype"):
                columns[name] = np.array([value or "" for value in table.column(name).to_pylist()], dtype=object)
            elif name == "graph":
                columns[name] = table.column(name).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
            elif name == "seconds":
                columns[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            else:
                columns[name] = table.column(name).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        unknown = sorted(set(columns["op"]) - set(OPERATORS))
        if unknown:
            raise ValueError(f"operator profile {source} has unknown operators {unknown}; known: {', '.join(OPERATORS)}")
        bad = ~(columns["seconds"] >= 0) | ~np.isfinite(columns["seconds"])
        if bad.any():
            raise ValueError(f"operator profile {source}: {int(bad.sum())} row(s) with a negative or missing time")
        return cls(source, columns, dict(metadata or {}))

    def subset(self, indices) -> "OperatorProfile":
        """The same profile restricted to these rows (what a composed model keeps of it)."""
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        return OperatorProfile(self.source, {name: values[indices] for name, values in self.columns.items()},
                               self.metadata)

    def without(self, op: str) -> "OperatorProfile":
        """The same profile with no rows of this operator."""
        return self.subset(np.flatnonzero(self.columns["op"] != op))

    def to_json(self) -> dict:
        """Rows as lists per column, with the source and metadata."""
        rows = {}
        for name, values in self.columns.items():
            rows[name] = values.tolist() if name not in ("op", "variant", "dtype") else [str(v) for v in values]
        return {"source": self.source, "metadata": self.metadata, "rows": rows}

    @classmethod
    def from_json(cls, data: dict) -> "OperatorProfile":
        """Inverse of to_json()."""
        rows = data["rows"]
        table = pa.table({f.name: pa.array(rows.get(f.name, [0] * len(rows["op"])), type=f.type)
                          for f in OPERATOR_PROFILE_SCHEMA})
        return cls.from_table(table, source=data.get("source", "operator profile"), metadata=data.get("metadata"))

    def rows_of(self, op: str, *, variant: str | None = "", dtype: str | None = None) -> np.ndarray:
        """Indices of an operator's rows (of this variant and dtype when given), graph-timed rows preferred."""
        columns = self.columns
        selected = columns["op"] == op
        if variant is not None:
            selected &= columns["variant"] == variant
        if dtype is not None:
            selected &= columns["dtype"] == dtype
        graph = selected & columns["graph"].astype(bool)
        return np.flatnonzero(graph if graph.any() else selected)

    def values_of(self, op: str, column: str, **selection) -> list:
        """The distinct values of a column among an operator's rows (for error messages)."""
        return sorted(set(self.columns[column][self.rows_of(op, **selection)].tolist()))


@dataclass(frozen=True)
class ShapeChoice:
    """Which measured shape stands for the asked one, and the factor its times are scaled by."""

    rows: np.ndarray
    shape: tuple
    scale: float


def choose_shape(profile: OperatorProfile, rows: np.ndarray, key_columns: tuple[str, ...], wanted: tuple,
                 size) -> ShapeChoice:
    """The rows at exactly `wanted` (scale 1), else at the nearest measured shape scaled by size(wanted)/size(it)."""
    keys = np.column_stack([profile.columns[name][rows] for name in key_columns])
    shapes = sorted({tuple(int(v) for v in key) for key in keys})
    wanted = tuple(int(v) for v in wanted)
    if wanted in shapes:
        best = wanted
    else:
        def distance(shape):
            return sum(abs(math.log(max(w, 1) / max(s, 1))) for w, s in zip(wanted, shape)), math.prod(shape), shape
        best = min(shapes, key=distance)
    chosen = rows[np.all(keys == np.array(best), axis=1)]
    return ShapeChoice(chosen, best, 1.0 if best == wanted else size(wanted) / size(best))


def bracket(knots: np.ndarray, x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each x: the knots below and above it and its position between them (0 at the lower, 1 at the upper);
    flat below the first knot, the last segment extended above the last (position beyond 1)."""
    x = np.asarray(x, dtype=np.float64)
    if len(knots) == 1:
        zero = np.zeros(x.shape, dtype=np.int64)
        return zero, zero, np.zeros(x.shape)
    low = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, len(knots) - 2)
    weight = np.where(x <= knots[0], 0.0, (x - knots[low]) / (knots[low + 1] - knots[low]))
    return low, low + 1, weight


@dataclass(frozen=True)
class Grid:
    """Seconds on the grid of every axis's measured values (axes in the order given), made non-decreasing."""

    axes: tuple[np.ndarray, ...]
    seconds: np.ndarray

    def at(self, *point) -> np.ndarray:
        """Multilinear values at points (one array per axis, broadcast together), the first axis outermost."""
        xs = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in point))
        brackets = [bracket(knots, x) for knots, x in zip(self.axes, xs)]

        def value(depth: int, index: tuple) -> np.ndarray:
            if depth == len(brackets):
                return self.seconds[index]
            low_index, high_index, weight = brackets[depth]
            low = value(depth + 1, index + (low_index,))
            high = value(depth + 1, index + (high_index,))
            return low + weight * (high - low)

        return value(0, ())

    def along_first(self, first) -> np.ndarray:
        """The remaining axes' grid at these values of the first axis: shape (len(first), *remaining)."""
        low_index, high_index, weight = bracket(self.axes[0], np.asarray(first, dtype=np.float64))
        low, high = self.seconds[low_index], self.seconds[high_index]
        weight = weight.reshape(weight.shape + (1,) * (self.seconds.ndim - 1))
        return low + weight * (high - low)


def grid_of(profile: OperatorProfile, rows: np.ndarray, axis_columns: tuple[str, ...], scale: float = 1.0) -> Grid:
    """The grid of these rows' seconds over the named axes (see the module's rules), times `scale`."""
    points = np.column_stack([profile.columns[name][rows].astype(np.float64) for name in axis_columns])
    axes, seconds = _dense(points, profile.columns["seconds"][rows].astype(np.float64))
    return Grid(axes, seconds * scale)


def _dense(points: np.ndarray, seconds: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    first, inverse = np.unique(points[:, 0], return_inverse=True)
    if points.shape[1] == 1:
        mean = np.bincount(inverse, weights=seconds) / np.bincount(inverse)
        return (first,), non_decreasing(mean, np.bincount(inverse).astype(np.float64))
    # One line (or plane) per measured value of the first axis, each resampled onto the union of the others' values.
    lines = [_dense(points[inverse == i, 1:], seconds[inverse == i]) for i in range(len(first))]
    axes = tuple(np.unique(np.concatenate([line_axes[d] for line_axes, _ in lines]))
                 for d in range(points.shape[1] - 1))
    mesh = np.meshgrid(*axes, indexing="ij")
    stacked = np.stack([Grid(line_axes, values).at(*mesh) for line_axes, values in lines])
    return (first, *axes), np.maximum.accumulate(stacked, axis=0)


def non_decreasing(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence nearest to values in weighted least squares (pool adjacent violators): a slow
    outlier is averaged with its neighbours, not carried to every larger shape as a running maximum would."""
    means, sizes, counts = [], [], []
    for value, weight in zip(values.tolist(), weights.tolist()):
        means.append(value)
        sizes.append(weight)
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            mean, size, count = means.pop(), sizes.pop(), counts.pop()
            means[-1] = (means[-1] * sizes[-1] + mean * size) / (sizes[-1] + size)
            sizes[-1] += size
            counts[-1] += count
    return np.repeat(np.array(means), counts)


def position(knots: list[float], x: float) -> tuple[int, int, float]:
    """bracket() for one x in Python floats (predict()'s hot path): lower and upper knot, position between them."""
    if len(knots) == 1 or x <= knots[0]:
        return 0, min(1, len(knots) - 1), 0.0
    low = min(bisect_right(knots, x) - 1, len(knots) - 2)
    return low, low + 1, (x - knots[low]) / (knots[low + 1] - knots[low])


def linear(knots: list[float], values: list[float], x: float) -> float:
    """The piecewise-linear value at one x, by bracket()'s rule."""
    low, high, weight = position(knots, x)
    below = values[low]
    return below + weight * (values[high] - below)


def linear_increasing(knots: list[float], values: list[float], xs: list[float]) -> list[float]:
    """linear() at each of these increasing xs, bit for bit, walking the knots instead of a bisect per x."""
    out = []
    low, last = 0, len(knots) - 2
    for x in xs:
        if last < 0 or x <= knots[0]:
            out.append(linear(knots, values, x))
            continue
        while low < last and knots[low + 1] <= x:
            low += 1
        below = values[low]
        out.append(below + (x - knots[low]) / (knots[low + 1] - knots[low]) * (values[low + 1] - below))
    return out
