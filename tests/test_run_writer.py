"""The streamed run writer: row groups written on a thread of their own, in order, and a failed write reported."""

import numpy as np
import pyarrow.parquet as pq
import pytest

import analysis.run_writer
from analysis.run_schema import STEPS_SCHEMA
from analysis.run_writer import RunWriter
from engine.stats import RequestRecord


def _steps(first: int, count: int) -> dict[str, np.ndarray]:
    steps = np.arange(first, first + count, dtype=np.int64)
    columns = {name: np.zeros(count, dtype=np.float64 if STEPS_SCHEMA.field(name).type == "double" else np.int64)
               for name in STEPS_SCHEMA.names}
    columns["step"] = steps
    columns["start_time"] = steps * 0.01
    return columns


def test_row_groups_handed_to_the_thread_are_written_in_order(tmp_path):
    writer = RunWriter(tmp_path / "run", requests_per_group=3, steps_per_group=4)
    for first in range(0, 50, 5):
        writer.add_steps(_steps(first, 5))
    writer.add_requests([RequestRecord(f"r{index}", index * 0.1, 10, 5) for index in range(10)])
    path = writer.commit({"executor_kind": "sim"})
    steps = pq.read_table(path / "steps.parquet")
    assert steps.column("step").to_pylist() == list(range(50))
    assert pq.ParquetFile(path / "steps.parquet").metadata.num_row_groups == 13  # 12 whole groups of 4, then 2
    assert pq.read_table(path / "requests.parquet").column("request_id").to_pylist() == [f"r{i}" for i in range(10)]


def test_a_write_that_fails_on_the_thread_fails_the_run(tmp_path, monkeypatch):
    """A full disk while a row group is written in the background is raised when the run is sealed, and the
    abandoned run leaves no staging folder behind."""
    def no_space(self, table, **options):
        raise OSError(28, "No space left on device")

    writer = RunWriter(tmp_path / "run", steps_per_group=4)
    monkeypatch.setattr(analysis.run_writer.pq.ParquetWriter, "write_table", no_space)
    writer.add_steps(_steps(0, 8))
    with pytest.raises(OSError, match="No space left"):
        writer.seal()
    writer.discard()
    assert not writer.staging.exists()
    assert not (tmp_path / "run").exists()
