"""Every run column states its unit in the stored Parquet file; docs/run_schema.md lists them, and its pandas
example runs as written."""

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.run_schema import REQUESTS_COLUMNS, REQUESTS_SCHEMA, STEP_UNITS, STEPS_SCHEMA, column_unit
from analysis.run_store import read_run, run_metadata, write_run
from tests.runs import engine_run

DOC = Path(__file__).resolve().parent.parent / "docs" / "run_schema.md"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    requests, steps = engine_run(30, request_rate=20.0, seed=1)
    folder = tmp_path_factory.mktemp("base") / "runs" / "sim"
    write_run(folder, requests, steps, run_metadata(executor_kind="sim", model="qwen3-0.6b", provenance="roofline"))
    return folder


def test_every_time_column_says_seconds_in_the_file(run_folder):
    for file, schema in (("requests.parquet", REQUESTS_SCHEMA), ("steps.parquet", STEPS_SCHEMA)):
        stored = pq.read_schema(run_folder / file)
        assert stored.names == schema.names
        for name in stored.names:
            assert column_unit(stored, name) == column_unit(schema, name), (file, name)
            if name.endswith("_time") or name in ("ttft", "tpot", "e2e", "duration", "token_times"):
                assert column_unit(stored, name) == "s", (file, name)
    assert set(STEP_UNITS) == set(STEPS_SCHEMA.names)


def test_a_run_written_before_units_still_reads(run_folder, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for file in ("requests.parquet", "steps.parquet"):
        table = pq.read_table(run_folder / file)
        bare = table.cast(pa.schema([field.remove_metadata() for field in table.schema]))
        assert all(field.metadata is None for field in bare.schema)
        pq.write_table(bare, old / file)
    (old / "metadata.json").write_text((run_folder / "metadata.json").read_text())
    run = read_run(old)
    assert run.requests.num_rows == 30 and column_unit(run.requests.schema, "ttft") == "s"


def test_doc_tables_list_every_column_with_its_unit():
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]*) \|", text, flags=re.M))
    for name, _, unit, _ in REQUESTS_COLUMNS:
        assert rows.pop(name).strip() == (unit or ""), name
    for name, (unit, _) in STEP_UNITS.items():
        assert rows.pop(name).strip() == unit, name
    assert not rows, f"documented but not in the schema: {sorted(rows)}"


def test_doc_pandas_example_runs(run_folder, monkeypatch, capsys):
    pytest.importorskip("pandas")
    block = re.search(r"## Reading a run.*?```python\n(.*?)```", DOC.read_text(), flags=re.S).group(1)
    monkeypatch.chdir(run_folder.parent.parent)
    exec(compile(block, str(DOC), "exec"), {})
    printed = capsys.readouterr().out
    assert "50%" in printed and "roofline" in printed
