"""Tensor-parallel process group: rank/size queries, collectives, and the worker processes that follow rank 0."""

import os
import traceback

import torch
import torch.distributed as dist


def tp_rank() -> int:
    """This process's tensor-parallel rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def tp_size() -> int:
    """The tensor-parallel degree (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks in place (row-parallel outputs); a no-op at TP=1."""
    if tp_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's shard along the last dimension (vocab-parallel logits)."""
    world = tp_size()
    if world == 1:
        return tensor
    if dist.get_backend() == "gloo":  # CPU tests: gloo has no all_gather_into_tensor
        shards = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(shards, tensor.contiguous())
        return torch.cat(shards, dim=-1)
    gathered = torch.empty((world, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(gathered, tensor.contiguous())
    return gathered.movedim(0, -2).flatten(-2)


def all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest of an integer across ranks (the KV block count every rank can hold)."""
    if tp_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def init_process_group(rank: int, world_size: int, port: int) -> None:
    """Join the NCCL group of world_size processes on this host, one GPU each."""
    # NVLink multicast (NVLS) is off by policy on the shared GPU machines.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        device_id=torch.device("cuda", rank),
    )


def worker_main(rank: int, world_size: int, port: int, runner_kwargs: dict, commands, replies) -> None:
    """A follower rank: build the same runner, then run every step rank 0 sends until told to stop."""
    from engine.model_runner import ModelRunner

    runner, failed = None, False
    try:
        init_process_group(rank, world_size, port)
        runner = ModelRunner(**runner_kwargs, device=f"cuda:{rank}")
        replies.put(("ready", runner.num_kv_blocks))
        while True:
            command, payload = commands.get()
            if command == "execute":
                runner.execute(payload)
            elif command == "stop":
                break
    except Exception:  # the parent must hear about it or it would wait forever on a collective
        failed = True
        replies.put(("error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            if runner is not None:
                try:
                    runner.release_graphs()
                except RuntimeError:
                    if not failed:  # after a reported failure the device may hold its error still: leave anyway
                        raise
            dist.destroy_process_group()
