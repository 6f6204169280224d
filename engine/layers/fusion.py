"""Routing the small elementwise functions of the layers (norms, rotary, SwiGLU gate, sampler argmax) to Triton.

Unfused, each of these is 5 to 10 tiny torch kernels per call, about 1,500 kernels per decode step
of a 28-layer model: milliseconds even inside a CUDA graph. Each has a hand-written Triton kernel
doing the whole function in one launch (engine/kernels/), with the same signature and the same
numerics. A Triton launch costs ~10-20 us of host time, where a torch.compile'd function paid
~200-300 us of guard checks per call in eager steps. The functions stay plain torch until
enable_fusion() is called, and afterwards still for CPU tensors, so CPU runs and tests need no
compiler; the plain torch functions are also the kernels' references.
"""

import functools
import importlib

_FUSABLE: list["_Fusable"] = []
_ENABLED: list[bool] = []
"""[cpu_too] once enable_fusion() ran (empty before and after disable_fusion): a function marked fusable
later, when its module is first imported, is routed at once, so the order of imports never matters."""


class _Fusable:
    def __init__(self, fn, kernel: str) -> None:
        self.eager = fn
        self.current = fn
        self.kernel = kernel
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self.current(*args, **kwargs)


def fusable(kernel: str):
    """Mark a pure function whose Triton twin, "module:function" with the same signature, enable_fusion() may use."""
    if not isinstance(kernel, str) or kernel.count(":") != 1:
        raise ValueError(f"fusable: kernel {kernel!r} should be 'module:function'")

    def mark(fn):
        wrapper = _Fusable(fn, kernel)
        _FUSABLE.append(wrapper)
        if _ENABLED:
            _route(wrapper, _ENABLED[0])
        return wrapper

    return mark


def _on_cuda_only(eager, fused):
    def route(first, *args, **kwargs):
        # The first argument of every fusable function is a tensor on the device the call runs on.
        if first.is_cuda:
            return fused(first, *args, **kwargs)
        return eager(first, *args, **kwargs)

    return route


def enable_fusion(cpu_too: bool = False) -> None:
    """Route every fusable function to its Triton kernel for CUDA tensors (CPU tensors keep the torch code).

    cpu_too sends CPU tensors to the kernels as well: only for tests under TRITON_INTERPRET=1.
    Importing the kernels imports triton, so this happens here and not when the layers are imported.
    """
    _ENABLED[:] = [cpu_too]
    for wrapper in _FUSABLE:
        _route(wrapper, cpu_too)


def _route(wrapper: "_Fusable", cpu_too: bool) -> None:
    module_name, name = wrapper.kernel.split(":")
    fused = getattr(importlib.import_module(module_name), name)
    wrapper.current = fused if cpu_too else _on_cuda_only(wrapper.eager, fused)


def disable_fusion() -> None:
    """Back to the plain torch functions."""
    _ENABLED.clear()
    for wrapper in _FUSABLE:
        wrapper.current = wrapper.eager
