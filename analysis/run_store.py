"""A run folder on disk: requests.parquet, steps.parquet and metadata.json, written atomically."""

import dataclasses
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.run_schema import REQUESTS_SCHEMA, STEPS_SCHEMA
from engine.sequence import RequestStatus

REQUESTS_FILE = "requests.parquet"
STEPS_FILE = "steps.parquet"
METADATA_FILE = "metadata.json"
RUN_FILES = (REQUESTS_FILE, STEPS_FILE, METADATA_FILE)
EXECUTOR_KINDS = ("gpu", "cpu", "sim", "http")
"""Who served the run: the engine on a GPU or a CPU, the simulator, or an HTTP server (`bench serve`: no steps)."""
REQUEST_STATUSES = tuple(RequestStatus)
"""A request's status in requests.parquet: waiting or running only in a run stopped before the end."""
# Columns every reader relies on (metrics, compare, reports); the rest may be null (a request never
# scheduled has no first token time).
_NOT_NULL = {
    "request_id": ("request_id", "arrival_time", "prompt_len", "output_len", "status"),
    "step": tuple(STEPS_SCHEMA.names),
}
_SOFTWARE = ("twinfer", "torch", "triton", "transformers", "pyarrow", "numpy", "pandas", "plotly")


@dataclass(frozen=True)
class Run:
    """One stored run: its two tables, its metadata and where it lives."""

    path: Path
    requests: pa.Table
    steps: pa.Table
    metadata: dict

    @property
    def name(self) -> str:
        """A short label for tables and legends: the metadata's name, else the folder's."""
        return str(self.metadata.get("name") or self.path.name)

    @property
    def executor_kind(self) -> str | None:
        """gpu, cpu or sim, as recorded in the metadata."""
        return self.metadata.get("executor_kind")

    @property
    def trace_fingerprint(self) -> str | None:
        """The sha256 of the trace the run replayed, when recorded."""
        return self.metadata.get("trace_fingerprint")


def software_versions() -> dict[str, str | None]:
    """Versions of Python and the packages a run's numbers depend on (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in _SOFTWARE:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


class _HashSink(io.RawIOBase):
    """A writable file that feeds what is written to a hash."""

    def __init__(self, digest) -> None:
        super().__init__()
        self._digest = digest

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._digest.update(data)
        return len(data)


def trace_fingerprint(source: pa.Table | str | os.PathLike) -> str:
    """sha256 of a trace file's bytes, or of a trace table's values and schema (chunking ignored)."""
    digest = hashlib.sha256()
    if isinstance(source, pa.Table):
        # One chunk per column and no schema metadata, so equal tables hash equal however they were built.
        table = source.replace_schema_metadata(None).combine_chunks()
        # The IPC stream goes straight into the hash: a trace of millions of rows is not copied twice more.
        with pa.ipc.new_stream(pa.PythonFile(_HashSink(digest), mode="w"), table.schema) as writer:
            writer.write_table(table)
    else:
        with open(source, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def run_metadata(
    *,
    executor_kind: str,
    engine_config=None,
    model: str | None = None,
    gpu: str | None = None,
    profile: str | None = None,
    calibrated: bool | None = None,
    trace_name: str | None = None,
    trace_fingerprint: str | None = None,
    complete: bool = True,
    started_at: str | None = None,
    wall_duration: float | None = None,
    **extra,
) -> dict:
    """The metadata dict of a run, with the keys every reader relies on and the software versions."""
    if executor_kind not in EXECUTOR_KINDS:
        raise ValueError(f"executor_kind must be one of {EXECUTOR_KINDS}, got {executor_kind!r}")
    if engine_config is not None and not isinstance(engine_config, dict):
        engine_config = dataclasses.asdict(engine_config)
    metadata = {
        "executor_kind": executor_kind,
        "engine_config": engine_config,
        "model": model,
        "gpu": gpu,
        "profile": profile,
        "calibrated": calibrated,
        "trace_name": trace_name,
        "trace_fingerprint": trace_fingerprint,
        "complete": bool(complete),
        "started_at": started_at,
        "wall_duration": wall_duration,
        "software": software_versions(),
    }
    metadata.update(extra)
    return metadata


def _conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """The table with exactly the schema's columns, in order, cast to their types and checked; a mismatch
    raises a ValueError naming where (the file or table), the column and the offending value."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{where} lacks column(s) {missing}; expected the columns of analysis/run_schema.py")
    columns = []
    for field in schema:
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
            raise ValueError(
                f"{where}: column {field.name!r} is {column.type}, expected {field.type} ({error})"
            ) from error
    table = pa.Table.from_arrays(columns, schema=schema)
    for name in _NOT_NULL[schema.names[0]]:
        nulls = table.column(name).null_count
        if nulls:
            row = pc.index(pc.is_null(table.column(name)), True).as_py()
            raise ValueError(f"{where}: column {name!r} has {nulls} null value(s), the first at row {row}")
    check_values(table, where)
    return table


_TIME_COLUMNS = ("arrival_time", "first_scheduled_time", "first_token_time", "finish_time", "ttft", "tpot", "e2e",
                 "start_time", "duration")
"""Seconds from the run's start, or latencies: never negative, never infinite or NaN (null: not reached)."""
_COUNT_COLUMNS = ("prompt_len", "output_len", "max_tokens", "cached_tokens", "num_preemptions")


def check_values(table: pa.Table, where: str) -> None:
    """What a run's tables must hold whatever wrote them (a tampered or corrupt file is refused): known statuses,
    each request id once, times finite and not negative, counts not negative. Checks the columns present."""
    names = table.column_names
    if "status" in names:
        status = table.column("status")
        unknown = pc.invert(pc.is_in(status, value_set=pa.array(REQUEST_STATUSES)))
        if pc.any(unknown).as_py():
            row = pc.index(unknown, True).as_py()
            raise ValueError(
                f"{where}: column 'status' holds {status[row].as_py()!r} at row {row}; "
                f"expected one of {', '.join(REQUEST_STATUSES)}"
            )
    if "request_id" in names and table.num_rows:
        ids = table.column("request_id")
        if pc.count_distinct(ids).as_py() != table.num_rows:
            counts = pc.value_counts(ids)
            repeated = counts.filter(pc.greater(counts.field("counts"), 1))[0]
            first = pc.index(ids, repeated["values"]).as_py()
            raise ValueError(f"{where}: request id {repeated['values'].as_py()!r} appears "
                             f"{repeated['counts'].as_py()} times (first at row {first}); each request has one row")
    for name in _TIME_COLUMNS + ("token_times",):
        if name not in names:
            continue
        values = table.column(name)
        if name == "token_times":
            values = pc.list_flatten(values)
        bad = pc.or_kleene(pc.invert(pc.is_finite(values)), pc.less(values, 0))
        if pc.any(bad).as_py():
            value = values.filter(pc.fill_null(bad, False))[0].as_py()
            row = "" if name == "token_times" else f" at row {pc.index(pc.fill_null(bad, False), True).as_py()}"
            raise ValueError(f"{where}: column {name!r} holds {value!r}{row}; times are finite and not negative")
    for name in _COUNT_COLUMNS:
        if name in names and table.num_rows and pc.min(table.column(name)).as_py() is not None \
                and pc.min(table.column(name)).as_py() < 0:
            row = pc.index(pc.fill_null(pc.less(table.column(name), 0), False), True).as_py()
            raise ValueError(f"{where}: column {name!r} is negative at row {row}")


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def metadata_json(metadata: dict) -> str:
    """A run's metadata.json text: the software versions and complete=True unless given; plain JSON only."""
    metadata = dict(metadata)
    metadata.setdefault("software", software_versions())
    metadata.setdefault("complete", True)
    try:
        return json.dumps(metadata, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"run metadata is not plain JSON: {error}") from error


def write_run(out_dir: str | os.PathLike, requests: pa.Table, steps: pa.Table, metadata: dict) -> Path:
    """Write a run folder atomically: into a temporary sibling, then renamed over any earlier run there."""
    out_dir = Path(out_dir)
    requests = _conform(requests, REQUESTS_SCHEMA, "requests table")
    steps = _conform(steps, STEPS_SCHEMA, "steps table")
    metadata_text = metadata_json(metadata)

    staging = make_staging(out_dir)
    try:
        # zstd: smaller than the default snappy on these tables (about half) and no slower to write.
        _write_file(staging / REQUESTS_FILE, lambda f: pq.write_table(requests, f, compression="zstd"))
        _write_file(staging / STEPS_FILE, lambda f: pq.write_table(steps, f, compression="zstd"))
        _write_file(staging / METADATA_FILE, lambda f: f.write(metadata_text.encode()))
        commit_staging(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def make_staging(out_dir: Path) -> Path:
    """A new private folder next to out_dir to write a run into (commit_staging moves it into place); refuses
    an out_dir that is not an earlier run nor an empty folder."""
    if out_dir.exists() and not _is_replaceable(out_dir):
        raise FileExistsError(
            f"{out_dir} exists and is not a run folder (no {REQUESTS_FILE}); refusing to replace it"
        )
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.writing-"))
    # mkdtemp makes the folder private (0700); a run folder gets the permissions any new folder would (umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    return staging


def commit_staging(staging: Path, out_dir: Path) -> None:
    """Move a fully written staging folder to out_dir, atomically replacing an earlier run there."""
    if out_dir.exists() and not _is_replaceable(out_dir):
        raise FileExistsError(
            f"{out_dir} exists and is not a run folder (no {REQUESTS_FILE}); refusing to replace it"
        )
    parent = out_dir.parent
    if out_dir.exists():
        # rename() cannot replace a non-empty folder: move the old run aside first, so readers see
        # either the old run or the new one, never a mix.
        retired = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.replaced-"))
        os.rename(out_dir, retired / "run")
        os.rename(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, out_dir)
    _fsync_dir(parent)


def _is_replaceable(path: Path) -> bool:
    """Only an earlier run folder (or an empty folder) may be replaced: never a user's other files."""
    if not path.is_dir():
        return False
    return (path / REQUESTS_FILE).is_file() or not any(path.iterdir())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_table(path: Path, schema: pa.Schema) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from error
    return _conform(table, schema, str(path))


def read_run_metadata(path: str | os.PathLike) -> dict:
    """A run folder's metadata.json, checked as read_run checks it (without reading the tables)."""
    path = _check_run_folder(Path(path))
    return _read_metadata(path)


def _check_run_folder(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a run folder (a run is a folder holding {', '.join(RUN_FILES)})")
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a run folder: missing {', '.join(missing)}")
    return path


def _read_metadata(path: Path) -> dict:
    try:
        metadata = json.loads((path / METADATA_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path / METADATA_FILE}: invalid JSON at line {error.lineno}: {error.msg}") from error
    if not isinstance(metadata, dict):
        raise ValueError(f"{path / METADATA_FILE}: expected a JSON object, got {type(metadata).__name__}")
    if not isinstance(metadata.get("complete", True), bool):
        raise ValueError(f"{path / METADATA_FILE}: 'complete' is {metadata['complete']!r}; expected true or false")
    return metadata


def read_run(path: str | os.PathLike) -> Run:
    """Read a run folder; a clear error names what is missing or malformed."""
    path = _check_run_folder(Path(path))
    metadata = _read_metadata(path)
    requests = _read_table(path / REQUESTS_FILE, REQUESTS_SCHEMA)
    steps = _read_table(path / STEPS_FILE, STEPS_SCHEMA)
    return Run(path=path, requests=requests, steps=steps, metadata=metadata)
