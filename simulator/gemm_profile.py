"""The operator profile's gemm tables: F.linear(x[m, k], w[n, k]) as the engine's linear layers call it, for every
linear layer of every supported model at every TP, then a general grid of sizes no preset has."""

from simulator.operator_shapes import coarse_first, general_gemm_shapes, preset_gemm_shapes
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


POWER_RAMP_MS = (3.0, 30.0, 100.0, 300.0)
"""Chains a prefill GEMM runs back to back for, in milliseconds: the card holds its clock for tens of milliseconds
of full-rate matmuls, then slows toward its power cap (H200, session 12: 1.00x at 30 ms, 1.05-1.09x at 100 ms,
1.09-1.14x at 300 ms, SM clock 1,980 -> 1,500-1,700 MHz)."""
POWER_RAMP_PAUSE_S = 0.3
"""Idle before each chain, so that each starts from a card near its full clock."""


def power_ramp_table(run: TableRun, context: ProfileContext) -> None:
    """The largest prefill GEMMs of the presets (m 2,048) run back to back for each of POWER_RAMP_MS after an idle
    pause, the whole chain timed with CUDA events: seconds per call against how long the chain ran (width, in
    microseconds). A step of long compute-bound work pays the card's power cap that the profile's short bursts
    do not (on the CPU the chains are short and mean nothing)."""
    import time

    import torch.nn.functional as F

    m = 2048
    # The MLP's GEMMs of the presets at tp 1, the largest, the middle and the smallest: the power they draw differs.
    mlp = sorted({dims.linear_shapes(1)[name] for dims in context.models for name in ("gate_up", "down")},
                 key=lambda shape: shape[0] * shape[1])
    shapes = list(dict.fromkeys([mlp[-1], mlp[len(mlp) // 2], mlp[0]]))
    for n, k in shapes:
        if not run.open():
            return
        with run.guard(f"power_ramp n={n} k={k}"):
            copies = max(2, context.copies(n * k * context.itemsize))
            weights, x = context.random(copies, n, k), context.random(m, k)
            calls_per_graph = 10
            burst = context.timer.seconds(lambda i: F.linear(x, weights[i % copies]), calls=calls_per_graph)[0]
            chain = context.timer.chain(lambda i: F.linear(x, weights[i % copies]), calls_per_graph)
            for milliseconds in POWER_RAMP_MS if context.timer.on_cuda else POWER_RAMP_MS[:1]:
                if not run.open():
                    return
                replays = max(1, round(milliseconds / 1e3 / (burst * calls_per_graph)))
                time.sleep(POWER_RAMP_PAUSE_S if context.timer.on_cuda else 0.0)
                seconds = chain(replays) / (replays * calls_per_graph)
                run.add("power_ramp", seconds, 1, graph=context.timer.on_cuda, m=m, n=n, k=k,
                        width=round(1e6 * seconds * replays * calls_per_graph))
            del weights
