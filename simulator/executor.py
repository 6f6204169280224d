"""The simulator's executor: the engine's SchedulerOutput in, a predicted duration and dummy tokens out."""

from bisect import bisect_left

from engine.scheduler_output import SchedulerOutput, StepResult
from engine.stats import batch_features

# vLLM's decode CUDA-graph ladder: 1, 2, 4, then every multiple of 8 up to 512.
VLLM_CUDA_GRAPH_SIZES = (1, 2, 4, *range(8, 513, 8))


class CostModelExecutor:
    """Implements the Executor protocol with a cost model (calibrated CostModel or Roofline) instead of a GPU."""

    def __init__(
        self,
        cost_model,
        num_kv_blocks: int,
        *,
        cuda_graph_sizes=VLLM_CUDA_GRAPH_SIZES,
        enforce_eager: bool = False,
        token_id: int = 0,
        mixed_step_token_sizes=(),
        max_num_seqs: int = 0,
    ) -> None:
        """mixed_step_token_sizes: as the real engine with mixed_cuda_graphs, steps with prompt chunks of up to
        the largest of these tokens (and max_num_seqs sequences) run as graphs padded to the next size."""
        if not isinstance(num_kv_blocks, int) or isinstance(num_kv_blocks, bool) or num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be a positive integer, got {num_kv_blocks!r}")
        sizes = () if enforce_eager else tuple(sorted(set(cuda_graph_sizes)))
        if any(not isinstance(size, int) or size < 1 for size in sizes):
            raise ValueError(f"cuda_graph_sizes must be positive integers, got {cuda_graph_sizes!r}")
        self.cost_model = cost_model
        self._num_kv_blocks = num_kv_blocks
        self.cuda_graph_batch_sizes = sizes
        self.token_id = token_id
        # padded_size[n] for every batch a graph covers: a list index is cheaper than a bisect per step.
        max_size = sizes[-1] if sizes else 0
        self._padded = [0] + [sizes[bisect_left(sizes, n)] for n in range(1, max_size + 1)]
        self._mixed_sizes = () if enforce_eager else tuple(sorted(set(mixed_step_token_sizes)))
        self._max_num_seqs = max_num_seqs

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def calibrated(self) -> bool:
        return self.cost_model.calibrated

    @property
    def label(self) -> str:
        return self.cost_model.label

    def cuda_graph_batch_size(self, num_decode_seqs: int) -> int:
        """Padded graph size a pure-decode step of this many sequences replays, 0 when it runs eagerly."""
        return self._padded[num_decode_seqs] if num_decode_seqs < len(self._padded) else 0

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Predict the step's duration and give every sampling sequence token_id."""
        features = batch_features(scheduler_output)
        num_seqs = features.num_prefill_seqs + features.num_decode_seqs
        if features.num_batched_tokens == num_seqs:
            # One new token per row, decodes or a prompt's one-token last chunk (a whole-prompt cache hit):
            # the engine's runner sends such a step to its decode graphs, padded by sequences.
            graph_size = self.cuda_graph_batch_size(num_seqs)
        else:
            graph_size = self._mixed_graph_size(features)
        token_id = self.token_id
        sampled = {seq.seq_id: token_id for seq in scheduler_output.sequences if seq.samples}
        return StepResult(
            sampled_token_ids=sampled,
            duration=self.cost_model.predict(features, graph_size),
            cuda_graph_batch_size=graph_size,
        )

    def _mixed_graph_size(self, features) -> int:
        sizes = self._mixed_sizes
        if not sizes or features.num_prefill_seqs + features.num_decode_seqs > self._max_num_seqs:
            return 0
        index = bisect_left(sizes, features.num_batched_tokens)
        return sizes[index] if index < len(sizes) else 0

    def predict_decode_run(self, num_decode_seqs: int, decode_context_tokens: int, num_steps: int) -> list[float]:
        """Durations of num_steps consecutive pure-decode steps, context growing by num_decode_seqs a step.

        Exactly (bit for bit) what execute() would return step by step, for the engine's fast-forward.
        """
        if num_decode_seqs < 1 or num_steps < 0:
            raise ValueError(f"need num_decode_seqs >= 1 and num_steps >= 0, got {num_decode_seqs}, {num_steps}")
        return self.cost_model.predict_decode_run(
            num_decode_seqs, decode_context_tokens, num_steps, self.cuda_graph_batch_size(num_decode_seqs)
        )

    def shutdown(self) -> None:
        """Nothing to release; here so callers can treat every executor alike."""
