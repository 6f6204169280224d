"""The operator profile's overhead tables: what replaying a CUDA graph costs beyond its kernels, and what launching
kernels eagerly costs the host (a torch kernel, and one of the engine's Triton kernels through its launcher)."""

import time

import numpy as np

from simulator.operator_timing import ProfileContext, TableRun


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
