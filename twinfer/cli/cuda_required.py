"""The one-line refusal of a GPU-only command on a machine without CUDA, naming what runs there instead."""


class NoCudaError(ValueError):
    """A GPU-only command was asked for where torch sees no CUDA device."""


def require_cuda(what: str, instead: str) -> None:
    """Raise NoCudaError ("WHAT needs a CUDA GPU, and torch sees none here; INSTEAD") unless CUDA is usable."""
    import torch

    if torch.cuda.is_available():
        return
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    raise NoCudaError(f"{what} needs a CUDA GPU, and torch {torch.__version__} ({build}) sees none here; {instead}")
