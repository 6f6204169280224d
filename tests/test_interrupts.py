"""SIGTERM as SIGINT: an interrupted run keeps its finished part, marked incomplete, and exits 128 + the signal;
signals arriving while a run is written wait until it is."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import analysis.run_writer
from analysis.run_store import read_run
from twinfer.cli import main
from twinfer.interrupts import Interrupted, signals_as_interrupts, signals_deferred

ROOT = Path(__file__).resolve().parent.parent
NUM_REQUESTS = 30000


def test_sigterm_raises_an_interrupt_that_exits_143():
    with pytest.raises(Interrupted) as raised:
        with signals_as_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # let the handler run
    assert raised.value.signum == signal.SIGTERM and raised.value.exit_status == 143
    assert isinstance(raised.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


def test_signals_are_held_back_while_deferred_and_reported_after():
    with signals_deferred() as deferred:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)
    assert deferred.interrupt.signum == signal.SIGINT  # the first one
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _progress_started(process: subprocess.Popen) -> None:
    """Read the progress bar (stderr) until some request is done: the run is under way, with a finished part."""
    seen = b""
    while True:
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, f"the run ended before any progress: {seen.decode(errors='replace')[-2000:]}"
        seen += chunk
        done = [int(n) for n in re.findall(rb"(\d+)/%d" % NUM_REQUESTS, seen)]
        if any(0 < n < NUM_REQUESTS for n in done):
            return


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_in_the_middle_of_a_simulation_writes_the_finished_part(tmp_path, signum, status):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "twinfer", "simulate", f"random:num_prompts={NUM_REQUESTS},input_len=800,output_len=200",
         "--arrivals", "poisson:5", "--model", "qwen3-0.6b", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _progress_started(process)
        process.send_signal(signum)
        stdout, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == status
    name = signal.Signals(signum).name
    assert f"interrupted ({name}): the finished part is in {out}" in stdout.decode()
    run = read_run(out)
    assert run.metadata["complete"] is False and run.metadata["stopped_by"] == name
    statuses = run.requests.column("status").to_pylist()
    assert len(statuses) == NUM_REQUESTS and set(statuses) == {"finished", "aborted"}
    reasons = {reason for reason, s in zip(run.requests.column("reason").to_pylist(), statuses) if s == "aborted"}
    assert reasons == {"aborted: interrupted" if name == "SIGINT" else f"aborted: interrupted by {name}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder nor lock left


def test_a_signal_while_the_run_is_written_waits_for_the_writing(tmp_path, monkeypatch, capsys):
    seal = analysis.run_writer.RunWriter.seal

    def seal_and_get_terminated(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return seal(self)

    monkeypatch.setattr(analysis.run_writer.RunWriter, "seal", seal_and_get_terminated)
    out = tmp_path / "run"
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--no-progress", "--out", str(out)]) == 143
    assert "writing the run before stopping" in capsys.readouterr().out
    run = read_run(out)
    assert run.metadata["complete"] is True and run.requests.num_rows == 24


def test_an_interrupt_before_the_run_writes_nothing_and_exits_130(tmp_path, monkeypatch, capsys):
    import twinfer.cli.replay

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(twinfer.cli.replay, "load_trace", interrupted)
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--no-progress", "--out", str(tmp_path / "run")]) == 130
    assert "interrupted (SIGINT)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
