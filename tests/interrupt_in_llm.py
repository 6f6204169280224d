"""An LLM interrupted where Ctrl-C would reach it: inside the model's n-th step or right after the engine's n-th
step; shared by tests/test_llm_faults.py and benchmarks/interrupt_check.py (which runs it on a GPU)."""

from engine import LLM


class Interrupt:
    """Raises KeyboardInterrupt (or an error) inside the model's n-th step, or right after the engine's n-th step
    (where LLM.generate's progress callback runs)."""

    def __init__(self, llm: LLM, where: str, at: int, error: BaseException) -> None:
        self.llm, self.where, self.at, self.error = llm, where, at, error
        self.calls = 0

    def __enter__(self):
        engine, runner = self.llm.engine, self.llm.executor.runner
        if self.where == "model":
            original = runner.launch

            def launch(output):
                self._count()
                return original(output)

            runner.launch = launch
        else:
            original = engine.step

            def step():
                busy = original()
                self._count()
                return busy

            engine.step = step
        return self

    def _count(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise self.error

    def __exit__(self, *exc) -> None:
        self.llm.executor.runner.__dict__.pop("launch", None)
        self.llm.engine.__dict__.pop("step", None)
