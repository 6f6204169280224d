"""The operator profile's per-token tables: the KV-cache store, the fused residual-add RMSNorm, rotary (with and
without Qwen3's q/k norms), SwiGLU's gate, the embedding and the sampler, each through the engine's own code."""

import contextlib

from simulator.operator_shapes import BLOCK_SIZE, attention_layouts, distinct
from simulator.operator_timing import ProfileContext, TableRun


def _elementwise_calls(context: ProfileContext, bytes_per_call: int) -> int:
    return context.calls(context.ceilings.estimate(0, bytes_per_call), most=128)


def kv_store_table(run: TableRun, context: ProfileContext) -> None:
    """Writing m tokens' K and V into random slots of a layer's paged cache, V read from the packed qkv as the
    engine's attention layer passes it."""
    import torch

    layouts = attention_layouts(context.models, context.grid)
    for kv_heads, head_dim in distinct((kv, dim) for _, kv, dim in layouts):
        for m in context.grid.elementwise_m:
            if not run.open():
                return
            with run.guard(f"kv_store kv_heads={kv_heads} m={m}"):
                num_blocks = 2 * -(-m // BLOCK_SIZE)
                k_cache = context.random(num_blocks, BLOCK_SIZE, kv_heads, head_dim)
                v_cache = context.random(num_blocks, BLOCK_SIZE, kv_heads, head_dim)
                slots = torch.randperm(num_blocks * BLOCK_SIZE, device=context.device)[:m].to(torch.int32)
                key = context.random(m, kv_heads, head_dim)
                value = context.random(m, 3 * kv_heads * head_dim)[:, :kv_heads * head_dim].view(m, kv_heads, head_dim)
                calls = _elementwise_calls(context, 4 * m * kv_heads * head_dim * context.itemsize)
                run.time("kv_store", lambda i: context.backend.store_kvcache(key, value, k_cache, v_cache, slots),
                         calls=calls, m=m, num_kv_heads=kv_heads, head_dim=head_dim)


def rms_norm_table(run: TableRun, context: ProfileContext) -> None:
    """The fused residual-add RMSNorm over m tokens of each hidden size."""
    from engine.layers.norm import add_rms_norm

    for width in distinct(dims.hidden for dims in context.models):
        for m in context.grid.elementwise_m:
            if not run.open():
                return
            with run.guard(f"rms_norm width={width} m={m}"):
                x, residual, weight = context.random(m, width), context.random(m, width), context.random(width)
                calls = _elementwise_calls(context, 4 * m * width * context.itemsize)
                run.time("rms_norm", lambda i: add_rms_norm(x, residual, weight, 1e-6), calls=calls, m=m, width=width)


def rotary_table(run: TableRun, context: ProfileContext) -> None:
    """Rotary embedding of q and k read from the packed qkv, with Qwen3's per-head q/k norms (variant "qk_norm")
    for the layouts of Qwen3 models, without ("") for the others, as engine/layers/rotary.py runs them."""
    import torch
    from engine.layers.rotary import RotaryEmbedding, apply_rotary, norm_and_rotate
    from engine.model_config import RopeConfig

    max_positions = 32768
    tables = {}
    for heads, kv_heads, head_dim, qk_norm in attention_layouts(context.models, context.grid, True):
        if head_dim not in tables:
            with torch.device(context.device):
                tables[head_dim] = RotaryEmbedding(head_dim, max_positions, RopeConfig(theta=1e6)).cos_sin
        cos_sin = tables[head_dim]
        for m in context.grid.elementwise_m:
            if not run.open():
                return
            with run.guard(f"rotary {heads}/{kv_heads} m={m}"):
                q_size, kv_size = heads * head_dim, kv_heads * head_dim
                q, k, _ = context.random(m, q_size + 2 * kv_size).split([q_size, kv_size, kv_size], dim=-1)
                q, k = q.view(m, heads, head_dim), k.view(m, kv_heads, head_dim)
                positions = torch.randint(0, max_positions, (m,), dtype=torch.int32, device=context.device)
                if qk_norm:
                    q_weight, k_weight = context.random(head_dim), context.random(head_dim)
                    call = lambda i: norm_and_rotate(positions, q, k, cos_sin, q_weight, k_weight, 1e-6)  # noqa: E731
                else:
                    call = lambda i: apply_rotary(positions, q, k, cos_sin)  # noqa: E731
                calls = _elementwise_calls(context, 2 * m * (q_size + kv_size) * context.itemsize)
                run.time("rotary", call, calls=calls, variant="qk_norm" if qk_norm else "", m=m, num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=head_dim)


def silu_and_mul_table(run: TableRun, context: ProfileContext) -> None:
    """SwiGLU's gate over m tokens of each intermediate size per rank."""
    from engine.layers.activation import silu_and_mul

    grid = context.grid
    widths = distinct(dims.intermediate // tp for tp in grid.tp_candidates for dims in context.models
                      if tp in dims.tp_degrees(grid.tp_candidates))
    for width in widths:
        for m in grid.elementwise_m:
            if not run.open():
                return
            with run.guard(f"silu_and_mul width={width} m={m}"):
                x = context.random(m, 2 * width)
                calls = _elementwise_calls(context, 3 * m * width * context.itemsize)
                run.time("silu_and_mul", lambda i: silu_and_mul(x), calls=calls, m=m, width=width)


def embedding_table(run: TableRun, context: ProfileContext) -> None:
    """The token embedding (the engine's module, at TP 1) over m tokens of each hidden size."""
    import torch
    from engine.layers.embedding import VocabParallelEmbedding

    for width, vocab in distinct((dims.hidden, dims.vocab) for dims in context.models):
        if not run.open():
            return
        with run.guard(f"embedding width={width}"):
            with _default_dtype(context.dtype), torch.device(context.device):
                module = VocabParallelEmbedding(vocab, width)
            module.weight.normal_()
            for m in context.grid.elementwise_m:
                if not run.open():
                    return
                ids = torch.randint(0, vocab, (m,), dtype=torch.int32, device=context.device)
                calls = _elementwise_calls(context, 2 * m * width * context.itemsize)
                run.time("embedding", lambda i: module(ids), calls=calls, m=m, width=width)


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def sampler_table(run: TableRun, context: ProfileContext) -> None:
    """The engine's sampler over rows of logits of each vocabulary, greedy and random (temperature 0.8), timed
    eagerly as the engine runs it, after its graphs."""
    import torch
    from engine.sampler import Sampler, SamplingTensors

    sampler = Sampler(0, context.device)
    for vocab in distinct(dims.vocab for dims in context.models):
        for rows in context.grid.sampler_rows:
            if not run.open():
                return
            with run.guard(f"sampler vocab={vocab} rows={rows}"):
                logits = context.random(rows, vocab)
                temperatures = torch.full((rows,), 0.8, dtype=torch.float32, device=context.device)
                for variant, params in (("greedy", SamplingTensors()), ("random", SamplingTensors(temperatures))):
                    run.time("sampler", lambda i: sampler(logits, params), calls=1, graph=False, variant=variant,
                             m=rows, width=vocab)
