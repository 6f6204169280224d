"""GPU-only commands on a machine without CUDA: one line naming the alternative, exit code 2, no traceback."""

import pytest
import torch

from twinfer.cli import main


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("argv, alternatives", [
    (["replay", "demo", "--model", "tiny-qwen3"], ("--executor cpu", "--executor sim")),
    (["bench", "throughput"], ("--executor cpu", "--executor sim")),
    (["profile", "--model", "qwen3-0.6b"], ("--device cpu",)),
])
def test_one_line_naming_the_alternative(no_cuda, tmp_path, capsys, argv, alternatives):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)] if argv[0] != "bench" else argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "needs a CUDA GPU" in lines[0] and "Traceback" not in captured.err
    for alternative in alternatives:
        assert alternative in lines[0]
    assert not out.exists()

