"""All-reduce by message size at each TP, for the operator profile, where several GPUs are lent (NCCL, one process a
GPU; gloo on the CPU, which only checks the workers)."""

import os
import time
import traceback

import numpy as np

from simulator.operator_timing import ProfileContext, TableRun, median_event_seconds


def all_reduce_table(run: TableRun, context: ProfileContext) -> None:
    """NCCL all-reduce by message size at every TP up to the GPUs lent (nothing with one GPU)."""
    import torch

    count = torch.cuda.device_count() if context.timer.on_cuda else 0
    if count < 2:
        context.all_reduce_note = f"not measured ({count} GPU{'s' if count != 1 else ''})"
        return
    for tp in [tp for tp in (2, 4, 8) if tp <= count]:
        if not run.open():
            return
        with run.guard(f"all_reduce tp={tp}"):
            for message_bytes, seconds in time_all_reduce(tp, context.grid.all_reduce_bytes, context.dtype_name,
                                                          timeout=max(30.0, run.seconds_left())):
                run.add("all_reduce", seconds, 10, graph=False, bytes=message_bytes, tp=tp)
    context.all_reduce_note = f"measured on {count} GPUs"


def time_all_reduce(world: int, sizes, dtype: str, timeout: float = 120.0) -> list[tuple[int, float]]:
    """(bytes, median seconds) of an all-reduce over `world` processes, one GPU each (NCCL), or on the CPU (gloo)."""
    import torch.multiprocessing as mp

    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the shared GPU machines
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    port = _free_port()
    processes = [spawn.Process(target=_all_reduce_worker, args=(rank, world, port, list(sizes), dtype, results),
                               daemon=True) for rank in range(world)]
    for process in processes:
        process.start()
    try:
        status, payload = results.get(timeout=timeout)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    if status != "ok":
        raise RuntimeError(f"all-reduce worker failed:\n{payload}")
    return payload


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _all_reduce_worker(rank: int, world: int, port: int, sizes, dtype: str, results) -> None:
    """One rank: join the group, time each message size (rank 0 reports); any error is reported, not raised."""
    import torch
    import torch.distributed as dist

    try:
        on_cuda = torch.cuda.is_available()
        device = torch.device("cuda", rank) if on_cuda else torch.device("cpu")
        if on_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if on_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        timings = [(size, _time_one_all_reduce(size, getattr(torch, dtype), device)) for size in sizes]
        if rank == 0:
            results.put(("ok", timings))
    except Exception:  # noqa: BLE001 - the parent raises it with the traceback
        results.put(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _time_one_all_reduce(size: int, dtype, device) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.randn(max(1, size // dtype.itemsize), dtype=dtype, device=device)
    if device.type == "cuda":
        return median_event_seconds(lambda: dist.all_reduce(tensor), 5, 2)
    samples = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))
