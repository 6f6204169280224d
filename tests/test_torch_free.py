"""The simulator's commands (simulate, summary, compare, report, plan) run on a machine without torch, as on
a capacity planner's laptop: each runs here in a subprocess where importing torch or triton fails."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WITHOUT_TORCH = textwrap.dedent("""
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "triton"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NoTorch())
""")

TWINFER = WITHOUT_TORCH + textwrap.dedent("""
    from twinfer.cli import main

    sys.exit(main(sys.argv[1:]))
""")


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's packages, not an installed copy
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=300)


def twinfer(*args: str) -> str:
    result = run_without_torch(TWINFER, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_blocker_blocks():
    result = run_without_torch(WITHOUT_TORCH + "import torch")
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runs")
    runs = {"h100": folder / "demo-h100", "h200": folder / "demo-h200"}
    for gpu, out in runs.items():
        printed = twinfer("simulate", "demo", "--model", "qwen3-0.6b", "--gpu", gpu, "--out", str(out), "--no-progress")
        assert "Serving Benchmark Result" in printed
    return runs


@pytest.mark.parametrize("trace, flags", [("azure-conv", ()), ("mooncake-conv", ("--replicas", "2"))])
def test_simulate_bundled_traces(tmp_path, trace, flags):
    out = tmp_path / trace
    printed = twinfer("simulate", trace, "--model", "qwen3-0.6b", "--max-requests", "200", "--out", str(out),
                      "--no-progress", *flags)
    assert "Successful requests:" in printed and (out / "requests.parquet").exists()


def test_summary_compare_and_report(runs, tmp_path):
    assert "Serving Benchmark Result" in twinfer("summary", str(runs["h100"]))
    assert "ttft" in twinfer("compare", str(runs["h100"]), str(runs["h200"])).lower()
    report = tmp_path / "report.html"
    twinfer("report", str(runs["h100"]), str(runs["h200"]), "-o", str(report))
    assert report.stat().st_size > 0


def test_plan(tmp_path):
    out = tmp_path / "plan"
    printed = twinfer("plan", "azure-conv", "--model", "qwen3-0.6b", "--gpu", "h100", "--slo", "ttft:2000",
                      "--target-rate", "2", "--max-requests", "200", "--search-requests", "100", "--verify-top", "0",
                      "--search-steps", "2", "--workers", "1", "--no-progress", "--out", str(out))
    assert "rank config" in printed and (out / "plan.csv").exists()
