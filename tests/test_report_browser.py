"""The report in headless Chromium: every plot rendered, no console error, offline; screenshot kept."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from analysis.report import build_report
from analysis.run_store import Run, run_metadata
from tests.runs import engine_run

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

# Injected at the top of <head>: records uncaught errors, rejected promises and console.error calls,
# then writes them and the rendered plot count into the DOM that --dump-dom prints.
ERROR_PROBE = """<script>
window.__twinferErrors = [];
window.addEventListener('error', function (e) { window.__twinferErrors.push('error: ' + e.message); });
window.addEventListener('unhandledrejection', function (e) { window.__twinferErrors.push('rejection: ' + e.reason); });
(function () {
  var original = console.error;
  console.error = function () {
    window.__twinferErrors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
    return original.apply(console, arguments);
  };
})();
window.addEventListener('load', function () {
  setTimeout(function () {
    var probe = document.createElement('pre');
    probe.id = 'twinfer-probe';
    probe.textContent = JSON.stringify({
      errors: window.__twinferErrors,
      plots: document.querySelectorAll('.twinfer-figure .js-plotly-plot .plot-container .main-svg').length,
      rendered: Array.prototype.map.call(document.querySelectorAll('.twinfer-figure'), function (f) {
        return [f.dataset.figure, f.querySelectorAll('.plot-container').length,
                f.querySelectorAll('g.trace, g.barlayer .point').length];
      })
    });
    document.body.appendChild(probe);
  }, 500);
});
</script>"""


def find_chromium() -> str:
    """The chromium binary, installed with apt when allowed (CI or TWINFER_INSTALL_CHROMIUM), else skip."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    allowed = os.environ.get("CI") or os.environ.get("TWINFER_INSTALL_CHROMIUM")
    if allowed and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False, env=env, capture_output=True,
                       timeout=900)
        path = shutil.which("chromium")
        if path:
            return path
    pytest.skip(
        "headless Chromium not found: install Debian's package (apt-get install -y chromium), or set "
        "CI=1 or TWINFER_INSTALL_CHROMIUM=1 to let this test install it when running as root"
    )


def chromium_command(chromium: str, profile: Path) -> list[str]:
    return [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
        # Offline: every host name fails to resolve, so the report must carry all it needs.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--window-size=1400,4000",
    ]


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    requests, steps = engine_run(400, request_rate=20.0, seed=5)
    noisy = steps.column("duration").to_numpy() * np.random.default_rng(0).lognormal(0, 0.05, steps.num_rows)
    sim_steps = steps.set_column(steps.schema.get_field_index("duration"), "duration", pa.array(noisy))
    real = Run(folder / "real", requests, steps, run_metadata(executor_kind="gpu", trace_fingerprint="f", model="m"))
    sim = Run(folder / "sim", requests, sim_steps,
              run_metadata(executor_kind="sim", trace_fingerprint="f", model="m", calibrated=True))
    contents = build_report([real, sim], folder / "report.html")
    return contents


@pytest.mark.slow
def test_report_renders_in_chromium(chromium, report, tmp_path):
    # chromium comes first: without it the test skips before building the report.
    page = report.path.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\ssrc=", page), "the report must not load scripts from elsewhere"
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + ERROR_PROBE, 1), encoding="utf-8")

    dump = subprocess.run(
        chromium_command(chromium, tmp_path / "profile-dom") + ["--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert dump.returncode == 0, dump.stderr[-2000:]
    match = re.search(r'<pre id="twinfer-probe">(.*?)</pre>', dump.stdout, re.S)
    assert match, "the page never finished loading:\n" + dump.stderr[-2000:]
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    assert probe["errors"] == []
    assert "Uncaught" not in dump.stderr, dump.stderr[-2000:]
    # Step scatter (log axes), CDFs, over time (six rows: preemptions, prefix hits, finished req/s among them),
    # length distributions, and a timeline per run.
    assert [name for name, _, _ in probe["rendered"]] == ["real-vs-sim-1", "cdfs", "over-time", "lengths",
                                                          "timeline-0", "timeline-1"]
    assert len(probe["rendered"]) == report.num_figures == 6
    for name, containers, traces in probe["rendered"]:
        assert containers == 1, f"figure {name} did not render"
        assert traces > 0, f"figure {name} drew no trace"

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report_browser.png"
    screenshot.unlink(missing_ok=True)
    shot = subprocess.run(
        chromium_command(chromium, tmp_path / "profile-shot") + [f"--screenshot={screenshot}", report.path.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 50_000  # a blank page is a few kB
