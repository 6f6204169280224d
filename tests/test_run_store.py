"""Run folders: round trip, atomic replacement, a crash mid-write, and clear errors for non-runs."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.run_schema import STEPS_SCHEMA
from analysis.run_store import read_run, run_metadata, trace_fingerprint, write_run
from engine.sequence import RequestStatus
from tests.runs import engine_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tables():
    return engine_run(30, request_rate=20.0, seed=1)


def metadata(**extra):
    return run_metadata(executor_kind="sim", model="qwen3-0.6b", gpu="h100", trace_name="t",
                        trace_fingerprint="abc", **extra)


def test_round_trip(tmp_path, tables):
    requests, steps = tables
    write_run(tmp_path / "run", requests, steps, metadata(note="first"))
    run = read_run(tmp_path / "run")
    assert run.requests.equals(requests)
    assert run.steps.equals(steps)
    assert run.metadata["note"] == "first"
    assert run.metadata["complete"] is True
    assert run.metadata["software"]["python"]
    assert run.executor_kind == "sim" and run.trace_fingerprint == "abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary left behind


def test_replacing_a_run_is_atomic_and_clean(tmp_path, tables):
    requests, steps = tables
    write_run(tmp_path / "run", requests, steps, metadata(note="first"))
    write_run(tmp_path / "run", requests.slice(0, 5), steps, metadata(note="second"))
    run = read_run(tmp_path / "run")
    assert run.metadata["note"] == "second" and run.requests.num_rows == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_error_while_writing_keeps_the_old_run(tmp_path, tables, monkeypatch):
    requests, steps = tables
    write_run(tmp_path / "run", requests, steps, metadata(note="old"))
    import analysis.run_store as run_store

    real_write_table = run_store.pq.write_table
    calls = []

    def failing_write_table(table, where, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write_table(table, where, **kwargs)

    monkeypatch.setattr(run_store.pq, "write_table", failing_write_table)
    with pytest.raises(OSError, match="disk full"):
        write_run(tmp_path / "run", requests.slice(0, 3), steps, metadata(note="new"))
    assert read_run(tmp_path / "run").metadata["note"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_process_killed_mid_write_leaves_no_half_run(tmp_path, tables):
    # The process dies (no cleanup, no exception handling) after writing requests.parquet.
    for name, table in zip(("requests", "steps"), tables):
        pq.write_table(table, tmp_path / f"{name}-in.parquet")
    script = textwrap.dedent(
        f"""
        import os
        import analysis.run_store as run_store
        requests, steps = (run_store.pq.read_table({str(tmp_path)!r} + f"/{{name}}-in.parquet") for name in ("requests", "steps"))
        real = run_store.pq.write_table
        def dying(table, where, **kwargs):
            real(table, where, **kwargs)
            if table.num_columns == len(run_store.REQUESTS_SCHEMA):
                os._exit(9)
        run_store.pq.write_table = dying
        run_store.write_run({str(tmp_path / "run")!r}, requests, steps, {{"executor_kind": "sim"}})
        """
    )
    # From this checkout's root, so the child imports the same analysis package as this process.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 9, result.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_run(tmp_path / "run")


def test_read_errors_name_the_problem(tmp_path, tables):
    requests, steps = tables
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing requests.parquet, steps.parquet, metadata.json"):
        read_run(tmp_path / "empty")
    write_run(tmp_path / "run", requests, steps, metadata())
    (tmp_path / "run" / "steps.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="missing steps.parquet"):
        read_run(tmp_path / "run")
    write_run(tmp_path / "run2", requests, steps, metadata())
    (tmp_path / "run2" / "metadata.json").write_text("{\n  oops")
    with pytest.raises(ValueError, match=r"metadata.json: invalid JSON at line 2"):
        read_run(tmp_path / "run2")


def test_write_refuses_bad_tables_and_foreign_folders(tmp_path, tables):
    requests, steps = tables
    with pytest.raises(ValueError, match=r"requests table lacks column\(s\) \['ttft'\]"):
        write_run(tmp_path / "run", requests.drop_columns(["ttft"]), steps, metadata())
    with pytest.raises(ValueError, match="not plain JSON"):
        write_run(tmp_path / "run", requests, steps, {"executor_kind": "sim", "when": object()})
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a run folder"):
        write_run(folder, requests, steps, metadata())
    assert (folder / "notes.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="executor_kind"):
        run_metadata(executor_kind="tpu")


def test_trace_fingerprint(tmp_path):
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    rechunked = pa.concat_tables([table.slice(0, 1), table.slice(1)])
    assert trace_fingerprint(table) == trace_fingerprint(rechunked)
    assert trace_fingerprint(table) != trace_fingerprint(table.slice(1))
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,x\n")
    assert len(trace_fingerprint(path)) == 64
    metadata_dict = json.loads(json.dumps(run_metadata(executor_kind="gpu", trace_fingerprint=trace_fingerprint(path))))
    assert metadata_dict["trace_fingerprint"] == trace_fingerprint(str(path))


def test_schema_errors_name_the_file_the_column_and_the_row(tmp_path, tables):
    requests, steps = tables
    write_run(tmp_path / "run", requests, steps, metadata())
    requests_path = tmp_path / "run" / "requests.parquet"

    def read_with(table, path=requests_path):
        write_run(tmp_path / "run", requests, steps, metadata())
        pq.write_table(table, path)
        read_run(tmp_path / "run")

    index = requests.schema.get_field_index("ttft")
    with pytest.raises(ValueError, match=r"requests.parquet: column 'ttft' is string, expected double"):
        read_with(requests.set_column(index, "ttft", pa.array(["fast"] * requests.num_rows)))
    # A status no reader knows would silently count the request as neither completed nor failed.
    index = requests.schema.get_field_index("status")
    statuses = requests.column("status").to_pylist()
    statuses[3] = "done"
    with pytest.raises(ValueError, match=r"requests.parquet: column 'status' holds 'done' at row 3"):
        read_with(requests.set_column(index, "status", pa.array(statuses)))
    index = steps.schema.get_field_index("num_running")
    running = steps.column("num_running").to_pylist()
    running[2] = None
    with pytest.raises(ValueError, match=r"steps.parquet: column 'num_running' has 1 null value\(s\), the first at row 2"):
        read_with(steps.set_column(index, "num_running", pa.array(running, pa.int64())),
                  tmp_path / "run" / "steps.parquet")
    with pytest.raises(ValueError, match=r"steps table: column 'duration' is string"):
        write_run(tmp_path / "other", requests,
                  steps.set_column(steps.schema.get_field_index("duration"), "duration",
                                   pa.array(["x"] * steps.num_rows)), metadata())


def test_runs_stored_in_benchmarks_data_still_read_with_their_columns_and_statuses():
    """The step columns come from StepRecord and statuses from RequestStatus: the runs stored must not notice."""
    folders = sorted(path.parent for path in (Path(__file__).parents[1] / "benchmarks" / "data").rglob("steps.parquet"))
    assert folders
    for folder in folders:
        run = read_run(folder)
        assert pq.read_schema(folder / "steps.parquet").names == STEPS_SCHEMA.names
        assert set(run.requests.column("status").to_pylist()) <= set(RequestStatus)


def _tampered(tmp_path, tables, change_requests=None, change_metadata=None):
    """A run written properly, then edited on disk as a hand or a broken tool might."""
    requests, steps = tables
    path = write_run(tmp_path / "run", requests, steps, metadata())
    if change_requests is not None:
        pq.write_table(change_requests(requests), path / "requests.parquet")
    if change_metadata is not None:
        data = json.loads((path / "metadata.json").read_text())
        change_metadata(data)
        (path / "metadata.json").write_text(json.dumps(data))
    return path


def _set(column: str, row: int, value):
    def change(table: pa.Table) -> pa.Table:
        values = table.column(column).to_pylist()
        values[row] = value
        index = table.column_names.index(column)
        return table.set_column(index, column, pa.array(values, table.schema.field(column).type))
    return change


@pytest.mark.parametrize("change, problem", [
    (lambda t: pa.concat_tables([t, t.slice(3, 1)]), r"request id 'req-3' appears 2 times \(first at row 3\)"),
    (_set("ttft", 2, -0.5), r"column 'ttft' holds -0.5 at row 2; times are finite and not negative"),
    (_set("arrival_time", 4, float("nan")), r"column 'arrival_time' holds nan at row 4"),
    (_set("e2e", 1, float("inf")), r"column 'e2e' holds inf at row 1"),
    (_set("output_len", 0, -3), r"column 'output_len' is negative at row 0"),
    (_set("token_times", 0, [0.1, float("nan")]), r"column 'token_times' holds nan"),
])
def test_tampered_requests_are_refused_on_read_with_the_row(tmp_path, tables, capsys, change, problem):
    path = _tampered(tmp_path, tables, change_requests=change)
    with pytest.raises(ValueError, match=problem):
        read_run(path)
    from twinfer.cli import main

    assert main(["summary", str(path)]) == 2
    assert "requests.parquet" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["no", 0, None, "false"])
def test_a_complete_flag_that_is_not_a_boolean_is_refused(tmp_path, tables, value):
    path = _tampered(tmp_path, tables, change_metadata=lambda data: data.update(complete=value))
    with pytest.raises(ValueError, match=f"'complete' is {value!r}; expected true or false"):
        read_run(path)
