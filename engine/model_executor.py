"""The real executor: the Executor protocol over a model runner, in-process or as tensor-parallel ranks."""

import socket
import time

import torch
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.model_config import load_model_config
from engine.model_runner import ModelRunner, PendingStep
from engine.scheduler_output import SchedulerOutput, StepResult


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PendingResult:
    """The StepResult of a launched step, once its samples reach the host."""

    def __init__(self, pending: PendingStep) -> None:
        self._pending = pending
        self._start = time.perf_counter()

    @property
    def device_seconds(self) -> float | None:
        """After result(), where the runner times device work (ModelRunner.time_device_work): its seconds."""
        return self._pending.device_seconds

    def result(self) -> StepResult:
        pending = self._pending
        sampled, graph_size = pending.result()
        return StepResult(sampled_token_ids=sampled, duration=time.perf_counter() - self._start,
                          cuda_graph_batch_size=graph_size, logprobs=pending.logprobs,
                          prompt_logprobs=pending.prompt_logprobs)


class ModelExecutor:
    """Runs each SchedulerOutput on the model (rank 0 in this process, other ranks in worker processes)."""

    def __init__(
        self,
        model: str,
        engine_config: EngineConfig,
        *,
        dtype: str = "auto",
        device: str = "cuda",
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        tensor_parallel_size: int = 1,
        attention_backend: str = "auto",
        load_format: str = "auto",
        seed: int = 0,
        cpu_kv_cache_bytes: int = 1 << 30,
        mixed_cuda_graphs: bool | None = None,
    ) -> None:
        model_config = load_model_config(model)
        if engine_config.max_model_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {engine_config.max_model_len} exceeds the model's max_position_embeddings "
                f"({model_config.max_position_embeddings}, {model_config.source})"
            )
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
        if engine_config.async_scheduling and tensor_parallel_size > 1:
            raise ValueError(
                f"asynchronous scheduling needs tensor_parallel_size 1 (got {tensor_parallel_size}): only rank 0 "
                "holds the samples the next step reads; turn it off (--no-async-scheduling)"
            )
        self.tensor_parallel_size = tensor_parallel_size
        self._workers: list = []
        self._commands: list = []
        runner_kwargs = dict(
            model=model, engine_config=engine_config, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager, attention_backend=attention_backend, load_format=load_format, seed=seed,
            cpu_kv_cache_bytes=cpu_kv_cache_bytes, mixed_cuda_graphs=mixed_cuda_graphs,
        )
        if tensor_parallel_size > 1:
            self._start_workers(tensor_parallel_size, runner_kwargs, device)
            device = "cuda:0"
        self.runner = ModelRunner(**runner_kwargs, device=device)
        if self._workers:
            self._await_workers()

    def _start_workers(self, world_size: int, runner_kwargs: dict, device: str) -> None:
        from engine.distributed import init_process_group, worker_main

        if torch.device(device).type != "cuda":
            raise ValueError("tensor_parallel_size > 1 needs device='cuda'")
        if torch.cuda.device_count() < world_size:
            raise ValueError(
                f"tensor_parallel_size {world_size} needs {world_size} GPUs; this machine has {torch.cuda.device_count()}"
            )
        context = mp.get_context("spawn")
        port = _free_port()
        self._replies = context.Queue()
        for rank in range(1, world_size):
            commands = context.Queue()
            process = context.Process(target=worker_main, daemon=True,
                                      args=(rank, world_size, port, runner_kwargs, commands, self._replies))
            process.start()
            self._workers.append(process)
            self._commands.append(commands)
        init_process_group(0, world_size, port)

    def _await_workers(self) -> None:
        for _ in self._workers:
            status, payload = self._replies.get()
            if status == "error":
                self.shutdown()
                raise RuntimeError(f"a tensor-parallel worker failed:\n{payload}")

    @property
    def num_kv_blocks(self) -> int:
        return self.runner.num_kv_blocks

    @property
    def cuda_graph_batch_sizes(self) -> list[int]:
        return self.runner.cuda_graph_batch_sizes

    @property
    def attention_backend(self) -> str:
        return self.runner.backend_name

    @property
    def mixed_cuda_graphs(self) -> bool:
        """Whether steps with prompt chunks run as CUDA graphs (the option once resolved)."""
        return self.runner.mixed_cuda_graphs

    def eager_prompt_steps(self):
        """A context in which steps with prompt chunks run eagerly (ModelRunner.eager_prompt_steps); TP 1 only,
        as the other ranks would go on replaying their graphs."""
        if self._workers:
            raise RuntimeError("eager_prompt_steps needs tensor_parallel_size 1")
        return self.runner.eager_prompt_steps()

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Run one step on every rank; rank 0 samples and times it (device sync included)."""
        for commands in self._commands:
            commands.put(("execute", scheduler_output))
        start = time.perf_counter()
        pending = self.runner.launch(scheduler_output)
        sampled, graph_size = pending.result()  # waits for the device
        return StepResult(sampled_token_ids=sampled, duration=time.perf_counter() - start,
                          cuda_graph_batch_size=graph_size, logprobs=pending.logprobs,
                          prompt_logprobs=pending.prompt_logprobs)

    def execute_async(self, scheduler_output: SchedulerOutput) -> "PendingResult":
        """Queue one step and return at once (asynchronous scheduling; one process, so TP size 1)."""
        if self._commands:
            raise RuntimeError("asynchronous scheduling needs tensor_parallel_size 1: only rank 0 holds the samples")
        return PendingResult(self.runner.launch(scheduler_output))

    def shutdown(self) -> None:
        """Stop the worker processes and leave the process group."""
        for commands in self._commands:
            commands.put(("stop", None))
        for process in self._workers:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        self._workers, self._commands = [], []
        import torch.distributed as dist

        if dist.is_initialized():
            self.runner.release_graphs()
            dist.destroy_process_group()
