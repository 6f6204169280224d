"""How the decode kernel splits a context over programs (engine/kernels/decode_attention.py), without Triton: the
cost model composes the kernel's programs from the same rule."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DecodeTiling:
    """Partition and tile shape of the decode kernels; the defaults measured fastest on an H100 for head_dim 64 and 128.

    Partitions of 512 rather than the 2% faster 1024 (at 256 x 1024 tokens) keep small batches spread over the SMs.
    """

    partition_size: int = 512
    """Context tokens per program; grown for very long contexts so at most max_partitions remain (over a work
    map: grown until the step's partitions fit the map, max_partitions aside)."""
    block_n: int = 128
    """Keys per inner-loop step."""
    max_partitions: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("partition_size", "block_n", "max_partitions"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"DecodeTiling.{name} must be a power of two, got {value}")
        if self.block_n < 16 or self.partition_size % self.block_n:
            raise ValueError(
                f"DecodeTiling: block_n ({self.block_n}) must be >= 16 "
                f"and divide partition_size ({self.partition_size})"
            )


def decode_partition_size(max_context_len: int, tiling: DecodeTiling) -> int:
    """Partition size for contexts up to max_context_len: tiling's, doubled until max_partitions suffice."""
    size = tiling.partition_size
    while -(-max_context_len // size) > tiling.max_partitions:
        size *= 2
    return size
