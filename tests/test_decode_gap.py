"""benchmarks/decode_gap.py sets the engine's decode step beside its composition: the composition must be of the
engine it timed (its max_model_len), or the attention it compares against is of a table four times as wide."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the script times the engine; its composed side runs anywhere


def _decode_gap():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_gap.py"
    spec = importlib.util.spec_from_file_location("decode_gap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_composed_side_is_as_wide_as_the_engine_timed():
    composed = _decode_gap().composed_classes
    # Llama-3-8B replays at max_model_len 8,192; the bundled H200 profile's decode tables are 32,768 wide.
    narrow = composed("NVIDIA H200", "llama-3-8b", 40, 40 * 1300, 40, max_model_len=8192)
    wide = composed("NVIDIA H200", "llama-3-8b", 40, 40 * 1300, 40, max_model_len=32768)
    assert narrow["attention"] < 0.9 * wide["attention"]
    assert narrow["gemm"] == wide["gemm"]
