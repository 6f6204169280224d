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
