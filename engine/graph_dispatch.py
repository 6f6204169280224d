"""Which CUDA graph a step replays: the integer rules the GPU runner and the cost-model executor share.

A step whose every row computes one new token (decodes, or a prompt's one-token last chunk after a prefix-cache
hit) takes a decode graph, padded up by sequences to the next size of vLLM's ladder. Any other step takes,
when mixed-step graphs are on and its rows fit, the graph of the next mixed-step token count. Past the largest
size a step runs eagerly. Torch-free, so the simulator decides exactly as the GPU does without importing it.
"""

from bisect import bisect_left
from dataclasses import dataclass, field

LARGEST_DECODE_GRAPH = 512


def decode_graph_sizes(max_num_seqs: int = LARGEST_DECODE_GRAPH) -> tuple[int, ...]:
    """vLLM's ladder 1, 2, 4, 8, 16, 24, ... up to the first size covering max_num_seqs (at most 512)."""
    sizes = []
    for size in (1, 2, 4, *range(8, LARGEST_DECODE_GRAPH + 1, 8)):
        sizes.append(size)
        if size >= max_num_seqs:
            break
    return tuple(sizes)


def mixed_step_token_sizes(max_num_batched_tokens: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded token counts of the graphs for steps with prompt chunks: powers of two and the halves between
    them (at most a third of padding), up to max_num_batched_tokens (which is always one of them)."""
    sizes = []
    size = smallest
    while size < max_num_batched_tokens:
        sizes.append(size)
        if size * 3 // 2 < max_num_batched_tokens and size >= 64:
            sizes.append(size * 3 // 2)
        size *= 2
    return tuple(sorted(set(sizes + [max_num_batched_tokens])))


def resolve_mixed_cuda_graphs(requested: bool | None, attention_backend: str, tensor_parallel_size: int) -> bool:
    """Whether steps with prompt chunks run as CUDA graphs (CUDA graphs being on): as requested, and when not
    told with the triton backend (the only one with a fixed layout) at TP 1 (not yet run above); requested
    with another backend is an error."""
    if requested is None:
        return attention_backend == "triton" and tensor_parallel_size == 1
    if requested and attention_backend != "triton":
        raise ValueError(f"mixed_cuda_graphs (--mixed-cuda-graphs) needs the triton attention backend, "
                         f"not {attention_backend}")
    return bool(requested)


def one_token_per_row(num_tokens: int, num_seqs: int) -> bool:
    """Whether a step of num_tokens new tokens over num_seqs rows (each at least one) goes to the decode graphs."""
    return num_tokens == num_seqs


@dataclass(frozen=True)
class GraphDispatch:
    """The captured graph sizes and the padded size each step takes; 0 everywhere means eager."""

    decode_sizes: tuple[int, ...] = ()
    """Batch sizes of the decode graphs (empty: decode steps run eagerly)."""
    mixed_sizes: tuple[int, ...] = ()
    """Token counts of the mixed-step graphs (empty: steps with prompt chunks run eagerly)."""
    max_mixed_seqs: int = 0
    """The most sequences a mixed-step graph holds (its sequence buffers' rows)."""
    _padded_decode: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """decode_size(n) for every n a graph covers: an index is cheaper than a bisect on the simulator's every step."""

    def __post_init__(self) -> None:
        for name in ("decode_sizes", "mixed_sizes"):
            sizes = tuple(sorted(set(getattr(self, name))))
            if any(not isinstance(size, int) or size < 1 for size in sizes):
                raise ValueError(f"{name} must be positive integers, got {getattr(self, name)!r}")
            object.__setattr__(self, name, sizes)
        sizes = self.decode_sizes
        largest = sizes[-1] if sizes else 0
        padded = (0, *(sizes[bisect_left(sizes, num_seqs)] for num_seqs in range(1, largest + 1)))
        object.__setattr__(self, "_padded_decode", padded)

    @classmethod
    def for_engine(cls, max_num_seqs: int, max_num_batched_tokens: int, *, cuda_graphs: bool,
                   mixed: bool) -> "GraphDispatch":
        """The graphs an engine of these limits captures: none without CUDA graphs; else the decode ladder up
        to max_num_seqs and, with mixed, graphs of steps with prompt chunks up to max_num_batched_tokens."""
        if not cuda_graphs:
            return cls()
        if not mixed:
            return cls(decode_graph_sizes(max_num_seqs))
        return cls(decode_graph_sizes(max_num_seqs), mixed_step_token_sizes(max_num_batched_tokens), max_num_seqs)

    def decode_size(self, num_seqs: int) -> int:
        """The decode graph's batch size a step of num_seqs one-token rows replays; 0 when it runs eagerly."""
        padded = self._padded_decode
        return padded[num_seqs] if num_seqs < len(padded) else 0

    def mixed_size(self, num_tokens: int, num_seqs: int) -> int:
        """The mixed-step graph's token count a step with prompt chunks replays; 0 when it runs eagerly."""
        sizes = self.mixed_sizes
        if not sizes or num_seqs > self.max_mixed_seqs:
            return 0
        index = bisect_left(sizes, num_tokens)
        return sizes[index] if index < len(sizes) else 0

    def graph_size(self, num_tokens: int, num_seqs: int) -> int:
        """The rows of the graph a step of num_tokens new tokens over num_seqs sequences replays; 0: eager."""
        if one_token_per_row(num_tokens, num_seqs):
            return self.decode_size(num_seqs)
        return self.mixed_size(num_tokens, num_seqs)

    def without_mixed_graphs(self) -> "GraphDispatch":
        """The same decode graphs, steps with prompt chunks eager."""
        return GraphDispatch(self.decode_sizes)
