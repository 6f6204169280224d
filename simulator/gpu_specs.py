"""Datasheet figures of the GPUs the roofline knows, plus what was measured on the ones we could run on."""

import re
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU model: memory, peak dense bf16 rate, memory and interconnect bandwidth."""

    name: str
    memory_gib: float
    """Memory as torch.cuda reports it (total_memory / 2**30), which is less than the marketing GB."""
    bf16_flops: float
    """Dense (no sparsity) bf16 tensor-core FLOP/s from the datasheet."""
    memory_bandwidth: float
    """Datasheet HBM/GDDR bandwidth, bytes/s."""
    interconnect_bandwidth: float
    """Per-GPU, per-direction bandwidth to its peers (NVLink, else PCIe), bytes/s."""
    measured_memory_bandwidth: float | None = None
    """Device-to-device copy bandwidth measured on the GPU machine, bytes/s (None: never measured)."""
    measured_bf16_flops: float | None = None
    """Large bf16 matmul rate measured on the GPU machine, FLOP/s (None: never measured)."""
    gpus_per_host: int = 8
    """The most of these GPUs one server holds (HGX boards and PCIe servers alike: 8); tensor parallelism
    runs within one host."""

    def __post_init__(self) -> None:
        if not isinstance(self.gpus_per_host, int) or self.gpus_per_host < 1:
            raise ValueError(f"GpuSpec {self.name!r}: gpus_per_host must be a positive integer, got {self.gpus_per_host!r}")
        for field_name in ("memory_gib", "bf16_flops", "memory_bandwidth", "interconnect_bandwidth"):
            value = getattr(self, field_name)
            if not value > 0:
                raise ValueError(f"GpuSpec {self.name!r}: {field_name} must be positive, got {value!r}")

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def effective_memory_bandwidth(self) -> float:
        """Measured copy bandwidth where known, else 90% of the datasheet (what copies reach on HBM)."""
        return self.measured_memory_bandwidth or 0.9 * self.memory_bandwidth

    @property
    def effective_bf16_flops(self) -> float:
        """Measured matmul rate where known, else 75% of the datasheet (large GEMMs rarely beat that)."""
        return self.measured_bf16_flops or 0.75 * self.bf16_flops


TERA = 1e12
GIGA = 1e9

# Datasheet numbers (NVIDIA product pages, dense bf16); memory_gib is what torch reports on the card.
GPU_SPECS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec(
            "h100",
            memory_gib=79.2,
            bf16_flops=989 * TERA,
            memory_bandwidth=3.35 * TERA,
            interconnect_bandwidth=450 * GIGA,
            measured_memory_bandwidth=3.0 * TERA,
        ),
        GpuSpec(
            "h200",
            memory_gib=139.8,
            bf16_flops=989 * TERA,
            memory_bandwidth=4.8 * TERA,
            interconnect_bandwidth=450 * GIGA,
            measured_memory_bandwidth=4.3 * TERA,
            measured_bf16_flops=787 * TERA,
        ),
        GpuSpec(
            "h100-pcie",
            memory_gib=79.2,
            bf16_flops=756 * TERA,
            memory_bandwidth=2.0 * TERA,
            interconnect_bandwidth=300 * GIGA,
        ),
        GpuSpec(
            "a100-80g",
            memory_gib=79.3,
            bf16_flops=312 * TERA,
            memory_bandwidth=2.039 * TERA,
            interconnect_bandwidth=300 * GIGA,
        ),
        GpuSpec(
            "a100-40g",
            memory_gib=39.4,
            bf16_flops=312 * TERA,
            memory_bandwidth=1.555 * TERA,
            interconnect_bandwidth=300 * GIGA,
        ),
        GpuSpec(
            "l40s",
            memory_gib=44.4,
            bf16_flops=362 * TERA,
            memory_bandwidth=0.864 * TERA,
            interconnect_bandwidth=32 * GIGA,
        ),
        GpuSpec(
            "l4",
            memory_gib=22.0,
            bf16_flops=121 * TERA,
            memory_bandwidth=0.3 * TERA,
            interconnect_bandwidth=32 * GIGA,
        ),
        GpuSpec(
            "b200",
            memory_gib=178.0,
            bf16_flops=2250 * TERA,
            memory_bandwidth=8.0 * TERA,
            interconnect_bandwidth=900 * GIGA,
        ),
    )
}

# How torch.cuda.get_device_name spells them, lower-cased, mapped to our keys (first match wins).
_DEVICE_NAME_KEYS = (
    ("h200", "h200"),
    ("h100 pcie", "h100-pcie"),
    ("h100", "h100"),
    ("a100-sxm4-40gb", "a100-40g"),
    ("a100-pcie-40gb", "a100-40g"),
    ("a100", "a100-80g"),
    ("l40s", "l40s"),
    ("l4", "l4"),
    ("b200", "b200"),
)


def gpu_key(device_name: str) -> str:
    """Our short key ('h100', 'h200', ...) for a spec key or a torch device name like 'NVIDIA H100 80GB HBM3'."""
    lowered = device_name.strip().lower()
    if lowered in GPU_SPECS:
        return lowered
    for fragment, key in _DEVICE_NAME_KEYS:
        # Whole names only: an L40 is no L4 and a GH200 no H200.
        if re.search(rf"(?<![a-z0-9]){re.escape(fragment)}(?![a-z0-9])", lowered):
            return key
    # Unknown cards keep a filesystem-safe version of their name so their profiles still get a stable key.
    return "-".join(lowered.replace("nvidia", "").split()) or "unknown"


def gpu_spec(name: str) -> GpuSpec:
    """The spec of a GPU by key or device name; a clear error lists the known ones."""
    key = gpu_key(name)
    if key not in GPU_SPECS:
        raise KeyError(f"unknown GPU {name!r}; known GPUs: {', '.join(sorted(GPU_SPECS))}")
    return GPU_SPECS[key]
