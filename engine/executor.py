"""The protocol every executor (real model or cost model) implements, and the optional abilities some add."""

from typing import Protocol, runtime_checkable

from engine.scheduler_output import SchedulerOutput, StepResult


class Executor(Protocol):
    """Runs the batches a scheduler decides on; never decides anything itself."""

    @property
    def num_kv_blocks(self) -> int:
        """How many KV blocks of the engine's block size this executor can hold."""
        ...

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Compute one step and return a token for each sequence that samples."""
        ...


class PendingStepResult(Protocol):
    """A launched step whose result is not in yet."""

    def result(self) -> StepResult:
        """Wait for the step and return its result."""
        ...


@runtime_checkable
class AsyncExecutor(Protocol):
    """An executor that can launch a step and return before it is done (the GPU's), so asynchronous
    scheduling overlaps the next step's scheduling with it."""

    def execute_async(self, scheduler_output: SchedulerOutput) -> PendingStepResult:
        """Launch one step; its result comes later."""
        ...


@runtime_checkable
class DecodeRunPredictor(Protocol):
    """An executor that can tell how long a run of pure-decode steps takes without executing them (a cost
    model), so the engine may fast-forward through them.

    Its execute() reads a step's batch from engine.stats.batch_features(output) alone and returns token_id for
    each sequence listed that samples: the engine may hand it a step whose running decodes it applies itself,
    the output listing only the prompts admitted beside them and its features counting every sequence."""

    token_id: int
    """The token it returns for every sampling sequence."""

    def predict_decode_run(self, num_decode_seqs: int, decode_context_tokens: int, num_steps: int) -> list[float]:
        """Durations of num_steps decode steps whose total context grows by num_decode_seqs a step;
        bit for bit what execute() would report for each."""
        ...

    def cuda_graph_batch_size(self, num_decode_seqs: int) -> int:
        """The CUDA-graph batch size execute() reports for a pure-decode step of this many sequences."""
        ...


@runtime_checkable
class ShutdownExecutor(Protocol):
    """An executor holding something to release when the run is over (worker processes)."""

    def shutdown(self) -> None:
        """Release it."""
        ...
