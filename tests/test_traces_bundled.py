"""A bundled sample's name is never silently shadowed by a local file or folder of that name."""

import warnings

import pytest

from traces import TraceWarning, read_trace


def test_bare_name_reads_the_sample_and_warns_of_the_local_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("arrival_time,prompt_len,output_len\n0.0,5,3\n")
    with pytest.warns(TraceWarning, match=r"'demo' is read as the bundled sample .*write \./demo"):
        bundled = read_trace("demo")
    assert len(bundled) == 24
    # Written as a path, the local file is read.
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)
        local = read_trace("./demo", format="native")
    assert len(local) == 1


def test_no_warning_without_a_local_namesake(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)
        assert len(read_trace("demo")) == 24
