"""Do a step's kernels cost more one after another than each timed on its own? (issue 15: composed decode steps of
the larger models come out 0.3-1.5 ms short, about 1 us per kernel, where their kernels' own times sum right).

For a model's layer without attention (RMSNorm, qkv GEMM, rotary, o GEMM, RMSNorm, gate_up GEMM, SwiGLU gate, down
GEMM: the engine's own functions, weights distinct per layer as in a forward pass) at m rows, this times in CUDA
graphs: the whole chain over the model's layers, and each operator alone over the same layers (as the operator
profile times it: a graph of many calls). Their difference per kernel is what a heterogeneous chain adds; the
composed model's value for the same operators is printed beside.

    python3 benchmarks/graph_chain.py [--models qwen3-0.6b,qwen3-1.7b,...] [--json OUT]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulator.operator_timing import OperatorTimer, median_event_seconds  # noqa: E402

ROWS = (4, 16, 64)


def layer_ops(dims, layers: int, m: int, device) -> dict:
    """name -> call(layer index): the layer's kernels in order, on tensors of their shapes."""
    from engine.layers.activation import silu_and_mul
    from engine.layers.norm import add_rms_norm
    from engine.layers.rotary import RotaryEmbedding, apply_rotary, norm_and_rotate
    from engine.model_config import RopeConfig

    shapes = dims.linear_shapes(1)

    def weights(name):
        n, k = shapes[name]
        return [torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02 for _ in range(layers)]

    w = {name: weights(name) for name in ("qkv", "o", "gate_up", "down")}
    norm_weight = torch.ones(dims.hidden, dtype=torch.bfloat16, device=device)
    x = torch.randn(m, dims.hidden, dtype=torch.bfloat16, device=device)
    residual = torch.randn_like(x)
    qkv = torch.randn(m, shapes["qkv"][0], dtype=torch.bfloat16, device=device)
    attn_out = torch.randn(m, shapes["o"][1], dtype=torch.bfloat16, device=device)
    gate_up = torch.randn(m, shapes["gate_up"][0], dtype=torch.bfloat16, device=device)
    act = torch.randn(m, shapes["down"][1], dtype=torch.bfloat16, device=device)
    q_size, kv_size = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(m, dims.heads, dims.head_dim), k.view(m, dims.kv_heads, dims.head_dim)
    with torch.device(device):
        cos_sin = RotaryEmbedding(dims.head_dim, 32768, RopeConfig(theta=1e6)).cos_sin
    positions = torch.randint(0, 4096, (m,), dtype=torch.int32, device=device)
    head_weight = torch.ones(dims.head_dim, dtype=torch.bfloat16, device=device)
    if dims.qk_norm:
        rotary = lambda i: norm_and_rotate(positions, q, k, cos_sin, head_weight, head_weight, 1e-6)  # noqa: E731
    else:
        rotary = lambda i: apply_rotary(positions, q, k, cos_sin)  # noqa: E731
    return {
        "norm1": lambda i: add_rms_norm(x, residual, norm_weight, 1e-6),
        "qkv": lambda i: F.linear(x, w["qkv"][i]),
        "rotary": rotary,
        "o": lambda i: F.linear(attn_out, w["o"][i]),
        "norm2": lambda i: add_rms_norm(x, residual, norm_weight, 1e-6),
        "gate_up": lambda i: F.linear(x, w["gate_up"][i]),
        "silu": lambda i: silu_and_mul(gate_up),
        "down": lambda i: F.linear(act, w["down"][i]),
    }


def graph_seconds(call, calls: int) -> float:
    run = OperatorTimer.capture(call, calls)
    return median_event_seconds(run, 7, 4)


def measure(model: str, device) -> list[dict]:
    from simulator.model_shape import ModelShape
    from simulator.operator_shapes import dims_of

    dims, layers = dims_of(model), ModelShape.load(model).num_layers
    rows = []
    for m in ROWS:
        ops = layer_ops(dims, layers, m, device)
        for op in ops.values():
            op(0)
        torch.cuda.synchronize()
        alone = {name: graph_seconds(op, layers) / layers for name, op in ops.items()}
        in_order = list(ops.values())
        chain = graph_seconds(lambda i: [op(i) for op in in_order], layers) / layers
        kernels = len(ops)
        rows.append({"model": model, "m": m, "layers": layers, "chain_us": 1e6 * chain,
                     "alone_us": {name: 1e6 * value for name, value in alone.items()},
                     "sum_alone_us": 1e6 * sum(alone.values()), "kernels": kernels,
                     "gap_us_per_kernel": 1e6 * (chain - sum(alone.values())) / kernels})
        print(f"{model:<12} m={m:<3} chain {1e6 * chain:8.1f} us/layer  alone {1e6 * sum(alone.values()):8.1f}  "
              f"gap {rows[-1]['gap_us_per_kernel']:+6.2f} us/kernel  "
              + " ".join(f"{name} {1e6 * value:.1f}" for name, value in alone.items()), flush=True)
        ops.clear()
        in_order.clear()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b,qwen3-8b,llama-3-8b,qwen3-32b")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from engine.layers.fusion import enable_fusion

    enable_fusion()
    device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    with torch.inference_mode():
        for model in args.models.split(","):
            rows += measure(model, device)
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
