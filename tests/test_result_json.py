"""The result JSON against vLLM 0.19.1's field list (vllm/benchmarks/serve.py of the vllm-0.19.1 wheel)."""

import datetime
import json

import pytest

from tests.test_metrics import hand_table
from twinfer.result_json import (ResultOptions, parse_metadata, parse_metric_percentiles, parse_percentile_metrics,
                                 result_json, result_path, write_result_json)

# vLLM 0.19.1, vllm/benchmarks/serve.py, main_async(): the set-up and traffic keys of result_json, in order.
VLLM_0_19_1_SETUP = ("date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts")
VLLM_0_19_1_TRAFFIC = ("request_rate", "burstiness", "max_concurrency")
# benchmark(): the result dict of a generation benchmark (BenchmarkMetrics). "rtfx" (ASR only) is left out.
VLLM_0_19_1_METRICS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                       "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
                       "max_output_tokens_per_s", "max_concurrent_requests")
# The per-request arrays that main_async() deletes unless --save-detailed.
VLLM_0_19_1_DETAILED = ("input_lens", "output_lens", "ttfts", "itls", "start_times", "generated_texts", "errors")
# process_one_metric(): mean_/median_/std_ and p{P}_ for each selected metric, in ms.
DATE = datetime.datetime(2026, 12, 3, 14, 5, 9)


def options(**changes):
    base = dict(backend="twinfer-sim", model_id="Qwen/Qwen3-0.6B", tokenizer_id="Qwen/Qwen3-0.6B", request_rate=2.0)
    return ResultOptions(**{**base, **changes})


def test_every_vllm_field_present_in_vllm_order():
    result = result_json(hand_table(), options(), date=DATE)
    keys = list(result)
    vllm_keys = [*VLLM_0_19_1_SETUP, *VLLM_0_19_1_TRAFFIC, *VLLM_0_19_1_METRICS[:9], *VLLM_0_19_1_METRICS[9:]]
    assert [key for key in keys if key in vllm_keys] == vllm_keys
    assert result["date"] == "20261203-140509"
    assert (result["backend"], result["endpoint_type"], result["model_id"]) == ("twinfer-sim", "twinfer-sim",
                                                                                 "Qwen/Qwen3-0.6B")
    assert result["num_prompts"] == 5
    assert (result["request_rate"], result["burstiness"], result["max_concurrency"]) == (2.0, 1.0, None)
    for key in VLLM_0_19_1_DETAILED:
        assert key not in result, key


def test_metrics_in_ms_for_the_selected_metrics_and_percentiles():
    result = result_json(hand_table(), options(percentile_metrics=("ttft", "itl"), metric_percentiles=(50.0, 99.9),
                                               goodput_ms={"ttft": 600}), date=DATE)
    # TTFTs of the finished requests: 0.5, 0.2, 1.0 s.
    assert result["mean_ttft_ms"] == pytest.approx(1700 / 3)
    assert result["median_ttft_ms"] == pytest.approx(500)
    assert result["p50_ttft_ms"] == pytest.approx(500)
    assert "p99.9_itl_ms" in result and "std_itl_ms" in result
    assert not any(key.endswith("_tpot_ms") or key.endswith("_e2el_ms") for key in result)
    assert "p99_ttft_ms" not in result
    # Two of three finished within 600 ms TTFT, over 3 s.
    assert result["request_goodput"] == pytest.approx(2 / 3)
    assert result["completed"] == 3 and result["failed"] == 2


def test_no_goodput_is_null_and_rate_inf_when_unset():
    result = result_json(hand_table(), options(request_rate=None), date=DATE)
    assert result["request_goodput"] is None
    assert result["request_rate"] == "inf"


def test_metadata_pairs_sit_between_setup_and_traffic():
    result = result_json(hand_table(), options(metadata=parse_metadata(["version=0.3.3", "tp=1", "note=a=b"])),
                         date=DATE)
    keys = list(result)
    assert keys.index("num_prompts") < keys.index("version") < keys.index("request_rate")
    assert (result["tp"], result["note"]) == ("1", "a=b")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_metadata(["tp"])


def test_detailed_arrays_per_request_in_arrival_order():
    texts = ["a", "b", "c", None, "e"]
    result = result_json(hand_table(), options(save_detailed=True, generated_texts=texts), date=DATE)
    # Arrival order: r0 (0.0), r4 (0.2), r1 (1.0), r2 (2.0), r3 (2.5).
    assert result["input_lens"] == [10, 7, 20, 5, 100_000]
    assert result["output_lens"] == [3, 0, 2, 1, 0]
    assert result["ttfts"] == pytest.approx([0.5, 0.0, 0.2, 1.0, 0.0])
    assert [len(gaps) for gaps in result["itls"]] == [2, 0, 1, 0, 0]
    assert result["itls"][0] == pytest.approx([0.1, 0.2])
    assert result["start_times"] == pytest.approx([0.0, 0.2, 1.0, 2.0, 2.5])
    assert result["generated_texts"] == ["a", None, "b", "c", None]
    assert result["errors"][0] == "" and result["errors"][1] == "aborted: client abort"
    assert result["errors"][4].startswith("rejected: prompt longer")


def test_vllm_file_naming_and_writing(tmp_path):
    result = result_json(hand_table(), options(label=None, max_concurrency=8), date=DATE)
    path = result_path(result, options(max_concurrency=8), result_dir=str(tmp_path / "out"))
    assert path.name == "twinfer-sim-2.0qps-concurrency8-Qwen3-0.6B-20261203-140509.json"
    written = write_result_json(result, path)
    assert json.loads(written.read_text())["completed"] == 3
    assert result_path(result, options(), result_dir=str(tmp_path), result_filename="x.json") == tmp_path / "x.json"
    assert list(tmp_path.joinpath("out").iterdir()) == [written]


def test_flag_parsers_name_the_bad_value():
    assert parse_percentile_metrics("ttft, e2el") == ("ttft", "e2el")
    assert parse_metric_percentiles("50,90,99.9") == (50.0, 90.0, 99.9)
    with pytest.raises(ValueError, match="--percentile-metrics 'ttft,latency'"):
        parse_percentile_metrics("ttft,latency")
    with pytest.raises(ValueError, match="'p99' is not a number"):
        parse_metric_percentiles("p99")
    with pytest.raises(ValueError, match="101 is not within"):
        parse_metric_percentiles("101")


def test_cli_vllm_habit_save_result_result_dir_filename(tmp_path, capsys, monkeypatch):
    from twinfer.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--gpu", "h100", "--out", str(out), "--no-progress",
                 "--request-rate", "4", "--save-result", "--result-dir", "results", "--result-filename", "r.json",
                 "--save-detailed", "--metadata", "tp=1", "gpu=h100", "--percentile-metrics", "ttft,e2el",
                 "--metric-percentiles", "50,90"]) == 0
    saved = json.loads((tmp_path / "results" / "r.json").read_text())
    assert saved["backend"] == "twinfer-sim" and saved["model_id"] == "qwen3-0.6b"
    assert (saved["request_rate"], saved["request_rate_source"], saved["num_prompts"]) == (4.0, "configured", 24)
    assert (saved["tp"], saved["gpu"]) == ("1", "h100")
    assert len(saved["ttfts"]) == len(saved["itls"]) == 24 and saved["errors"] == [""] * 24
    assert "p90_e2el_ms" in saved and "p50_ttft_ms" in saved and "mean_tpot_ms" not in saved
    printed = capsys.readouterr().out
    assert "P90 E2EL (ms):" in printed and "TPOT" not in printed

    # `summary` writes the same JSON from the stored run, under vLLM's default name in the current folder.
    assert main(["summary", str(out), "--save-result", "--label", "mine"]) == 0
    [written] = tmp_path.glob("mine-4.0qps-qwen3-0.6b-*.json")
    assert json.loads(written.read_text())["label"] == "mine"


def test_cli_bad_result_flags_fail_before_the_run(tmp_path, capsys):
    from twinfer.cli import main

    out = tmp_path / "run"
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--out", str(out), "--no-progress", "--save-result",
                 "--metadata", "tp"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err and not out.exists()
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--out", str(out), "--no-progress",
                 "--goodput", "ttft=500"]) == 2
    assert "ttft=500" in capsys.readouterr().err and not out.exists()
