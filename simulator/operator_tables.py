"""The operator profile's tables other than attention and the host: gemm as the linear layers call it, the
elementwise operators and the sampler, and the overheads of graph replays and eager launches."""

import contextlib
import time

import numpy as np

from simulator.operator_shapes import (BLOCK_SIZE, attention_layouts, coarse_first, distinct, general_gemm_shapes,
                                       preset_gemm_shapes)
from simulator.operator_timing import ProfileContext, TableRun


def gemm_table(run: TableRun, context: ProfileContext) -> None:
    """The presets' linear layers at every TP, over the m grid: a coarse pass over every shape, then the rest."""
    grid = context.grid
    shapes = preset_gemm_shapes(context.models, grid.tp_candidates, grid.lm_head_max_m)
    for ms in coarse_first(grid.gemm_m):
        _gemm_shapes(run, context, shapes, ms)


def general_gemm_table(run: TableRun, context: ProfileContext) -> None:
    """Powers of two and 1.5x steps of n and k, for sizes no preset has."""
    grid = context.grid
    exclude = preset_gemm_shapes(context.models, grid.tp_candidates, grid.lm_head_max_m)
    _gemm_shapes(run, context, general_gemm_shapes(grid, exclude), grid.general_m)


def _gemm_shapes(run: TableRun, context: ProfileContext, shapes, ms) -> None:
    """F.linear(x[m, k], w[n, k]) as the engine's linear layers call it, the weight rotated over copies."""
    import torch.nn.functional as F

    for n, k, largest_m in shapes:
        if not run.open():
            return
        with run.guard(f"gemm n={n} k={k}"):
            copies = context.copies(n * k * context.itemsize)
            weights = context.random(copies, n, k)
            for m in [m for m in ms if m <= largest_m]:
                if not run.open():
                    return
                x = context.random(m, k)
                estimate = context.ceilings.estimate(2 * m * n * k, context.itemsize * (n * k + m * k + m * n))
                run.time("gemm", lambda i: F.linear(x, weights[i % copies]), calls=context.calls(estimate, copies),
                         m=m, n=n, k=k)
            del weights


def _elementwise_calls(context: ProfileContext, bytes_per_call: int) -> int:
    return context.calls(context.ceilings.estimate(0, bytes_per_call), most=128)


def kv_store_table(run: TableRun, context: ProfileContext) -> None:
    """Writing m tokens' K and V into random slots of a layer's paged cache, V read from the packed qkv as the
    engine's attention layer passes it."""
    import torch

    layouts = attention_layouts(context.models, context.grid.tp_candidates)
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
    for heads, kv_heads, head_dim, qk_norm in attention_layouts(context.models, context.grid.tp_candidates, True):
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




def graph_replay_table(run: TableRun, context: ProfileContext) -> None:
    """A CUDA graph of m one-element kernels, replayed and waited for on the host clock: the seconds a step pays
    for its graph beyond the kernels' work (on the CPU, the m kernels run eagerly)."""
    import torch

    x = context.random(1)
    for nodes in context.grid.replay_nodes:
        if not run.open():
            return
        with run.guard(f"graph_replay m={nodes}"):
            def burst():
                for _ in range(nodes):
                    x.neg_()

            replay, graph = burst, False
            if context.timer.on_cuda:
                replay, graph = context.timer.capture(lambda i: burst(), 1), True
            seconds, repeats = _host_seconds(replay, context)
            run.add("graph_replay", seconds, repeats, graph=graph, m=nodes)


def launch_table(run: TableRun, context: ProfileContext) -> None:
    """m kernels launched eagerly one after another and waited for on the host clock: a torch one ("torch") and
    one of the engine's Triton kernels through its Python launcher ("triton", the SwiGLU gate of one token)."""
    from engine.layers.activation import silu_and_mul

    x, gate_up = context.random(1), context.random(1, 128)
    kernels = {"torch": lambda: x.neg_(), "triton": lambda: silu_and_mul(gate_up)}
    for count in context.grid.launch_counts:
        for variant, kernel in kernels.items():
            if not run.open():
                return
            with run.guard(f"launch {variant} m={count}"):
                def burst():
                    for _ in range(count):
                        kernel()

                seconds, repeats = _host_seconds(burst, context)
                run.add("launch", seconds, repeats, variant=variant, graph=False, m=count)


def _host_seconds(run, context: ProfileContext, repeats: int = 20) -> tuple[float, int]:
    """Median host-clock seconds of run() up to the device being done with it."""
    import torch

    def wait():
        if context.timer.on_cuda:
            torch.cuda.synchronize()

    run()
    wait()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        wait()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)), repeats
