"""twinfer: an LLM inference engine and its simulated twin.

The public API, as in vLLM: `from twinfer import LLM, SamplingParams, EngineArgs, read_run`. Names are resolved
on first use, so importing twinfer to read runs or simulate never imports torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "LLM": "engine.llm",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "EngineArgs": "engine.engine_args",
    "EngineConfig": "engine.config",
    "read_run": "analysis.run_store",
    "Run": "analysis.run_store",
    "compute_metrics": "analysis.metrics",
    "read_trace": "traces",
    "Trace": "traces.schema",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'twinfer' has no attribute {name!r}")
