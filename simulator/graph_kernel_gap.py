"""What a CUDA-graph step costs per kernel beyond its operators' own times, measured on the operator profile's probe.

Every operator is timed in a CUDA graph of many calls of itself, so its seconds hold the spacing between two
identical kernels. A step's graph chains different kernels (a GEMM, a norm, attention, ...), and held against the
engine's own steps the sum of its operators comes out short by a roughly fixed amount per kernel (H200, session 11:
0.3-0.6 ms of a 7-25 ms Qwen3-8B, Llama-3-8B or Qwen3-32B decode step, `benchmarks/decode_gap.py`). The profile's
host_step table serves a load on its probe model (never a validated one) and keeps each CUDA-graph step's batch and
wait for the device (metadata "host_step", "graph_steps"); the probe composed from the same profile predicts those
waits, and the median shortfall per kernel of the probe's graph is what every composed graph step adds per kernel.
"""

import json

import numpy as np

GRAPH_STEP_COLUMNS = ("num_prefill_seqs", "num_prefill_tokens", "num_decode_seqs", "decode_context_tokens",
                      "prefill_context_tokens", "prefill_attention_work", "num_batched_tokens",
                      "cuda_graph_batch_size", "device_wait")
"""The columns of the probe's graph steps kept in the profile's metadata."""


def graph_steps_report(steps: list[dict]) -> dict[str, list]:
    """The probe's CUDA-graph serving steps (dicts with the step columns and device_wait) as columns for the
    metadata, rounded to what a timer resolves."""
    graph = [step for step in steps if step["cuda_graph_batch_size"] > 0]
    return {name: [round(float(step[name]), 9) if name == "device_wait" else step[name] for step in graph]
            for name in GRAPH_STEP_COLUMNS}


def probe_graph_steps(metadata: dict) -> tuple[str, int, dict[str, np.ndarray]] | None:
    """(probe model, its max_model_len, graph step columns) from a profile's metadata, or None if it has none."""
    try:
        report = json.loads(metadata.get("host_step", ""))
    except json.JSONDecodeError:
        return None
    if not isinstance(report, dict) or not isinstance(report.get("graph_steps"), dict) or not report.get("probe"):
        return None
    steps = report["graph_steps"]
    if any(name not in steps for name in GRAPH_STEP_COLUMNS) or not steps["device_wait"]:
        return None
    return (report["probe"], int(report.get("probe_max_model_len") or 0),
            {name: np.asarray(steps[name], dtype=np.float64) for name in GRAPH_STEP_COLUMNS})


def graph_kernel_seconds(probe_model, steps: dict[str, np.ndarray], kernels_of) -> float:
    """The median over the probe's graph steps of (device wait - the probe's composed GPU part) / kernels in the
    step's graph. probe_model: the probe composed without this term; kernels_of(single): kernels of a decode
    graph (single True) or a mixed-step graph."""
    predicted = probe_model.predict_columns(steps)
    host = probe_model.host_columns(steps)
    rows = steps["num_prefill_seqs"] + steps["num_decode_seqs"]
    single = steps["num_batched_tokens"] == rows
    kernels = np.where(single, kernels_of(True), kernels_of(False))
    return float(np.median((steps["device_wait"] - (predicted - host)) / kernels))
