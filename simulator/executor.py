"""The simulator's executor: the engine's SchedulerOutput in, a predicted duration and dummy tokens out."""

from engine.graph_dispatch import GraphDispatch, decode_graph_sizes
from engine.scheduler_output import SchedulerOutput, StepResult
from engine.stats import batch_features

DECODE_GRAPHS_ONLY = GraphDispatch(decode_graph_sizes())
"""vLLM's whole decode ladder (1, 2, 4, then every multiple of 8 up to 512) and no mixed-step graphs."""


class CostModelExecutor:
    """Implements the Executor protocol with a cost model (calibrated CostModel or Roofline) instead of a GPU."""

    def __init__(self, cost_model, num_kv_blocks: int, *, graphs: GraphDispatch = DECODE_GRAPHS_ONLY,
                 token_id: int = 0) -> None:
        """graphs: the CUDA graphs the real engine would capture (GraphDispatch.for_engine); a step costs as
        the graph it would replay, or as an eager step."""
        if not isinstance(num_kv_blocks, int) or isinstance(num_kv_blocks, bool) or num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be a positive integer, got {num_kv_blocks!r}")
        self.cost_model = cost_model
        self._num_kv_blocks = num_kv_blocks
        self.graphs = graphs
        self.token_id = token_id

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def label(self) -> str:
        return self.cost_model.label

    def cuda_graph_batch_size(self, num_decode_seqs: int) -> int:
        """Padded graph size a pure-decode step of this many sequences replays, 0 when it runs eagerly."""
        return self.graphs.decode_size(num_decode_seqs)

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Predict the step's duration and give every sampling sequence token_id."""
        features = batch_features(scheduler_output)
        graph_size = self.graphs.graph_size(features.num_batched_tokens,
                                            features.num_prefill_seqs + features.num_decode_seqs)
        token_id = self.token_id
        sampled = {seq.seq_id: token_id for seq in scheduler_output.sequences if seq.samples}
        return StepResult(
            sampled_token_ids=sampled,
            duration=self.cost_model.predict(features, graph_size),
            cuda_graph_batch_size=graph_size,
        )

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
