"""Bad command lines fail before any work, in one line naming the problem, and write nothing."""

import pytest
import torch

from twinfer.cli import main

SIMULATE = ["simulate", "demo", "--model", "qwen3-0.6b", "--no-progress"]


@pytest.mark.parametrize("flags, problem", [
    (["--tp", "0"], "tensor_parallel_size must be a positive integer, got 0"),
    (["--max-num-seqs", "0"], "max_num_seqs must be a positive integer or None, got 0"),
    (["--max-num-batched-tokens", "0"], "max_num_batched_tokens must be a positive integer or None, got 0"),
    (["--max-model-len", "0"], "max_model_len must be a positive integer or None, got 0"),
    (["--max-model-len", "100000000"], "max_model_len 100000000 exceeds the model's max_position_embeddings (40960"),
    (["--replicas", "0"], "--replicas must be a positive integer, got 0"),
    (["--replicas", "-1"], "--replicas must be a positive integer, got -1"),
    (["--goodput", "ttft500"], "invalid goodput SLO 'ttft500'"),
    (["--goodput", "ttfx:500"], "unknown goodput SLO 'ttfx'"),
])
def test_bad_sizes_and_slos_are_refused_before_any_work(tmp_path, capsys, flags, problem):
    assert main([*SIMULATE, "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinfer simulate: error: ") and problem in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no run folder, lock nor staging


@pytest.mark.parametrize("command", [["summary"], ["compare", "OTHER"], ["report", "-o", "OUT"]])
def test_a_plain_file_given_as_a_run_is_a_one_line_error(tmp_path, capsys, command):
    plain = tmp_path / "notes.txt"
    plain.write_text("not a run")
    argv = [command[0], str(plain)] + [str(tmp_path / "x") if a in ("OTHER", "OUT") else a for a in command[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{plain} is not a run folder" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_the_gpu_executor_without_cuda_says_so_and_what_to_use_instead(tmp_path, capsys):
    assert main(["replay", "demo", "--executor", "gpu", "--model", "tiny-qwen3", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--executor cpu" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
