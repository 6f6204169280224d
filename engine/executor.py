"""The protocol every executor (real model or cost model) implements."""

from typing import Protocol

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
