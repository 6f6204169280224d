"""An executor for tests: a 'model' whose KV cache holds token ids and whose next token hashes its context.

Because every sampled token is a function of the whole context read back through the block table,
a wrong block table, a prefix-cache hit on the wrong block or a lost recompute changes the outputs.
"""

import xxhash

from engine.scheduler_output import PENDING_TOKEN, SchedulerOutput, StepResult
from engine.stats import batch_features


class PagedEchoExecutor:
    """Writes each new token into its KV slot, and samples hash(context) for sequences that sample."""

    def __init__(self, num_kv_blocks: int, block_size: int, vocab_size: int = 1000, step_duration: float = 0.01):
        self._num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.step_duration = step_duration
        self.kv = [[-1] * block_size for _ in range(num_kv_blocks)]
        self.steps: list[SchedulerOutput] = []
        self.last_sampled: dict[int, int] = {}
        """The previous step's samples: what a PENDING_TOKEN stands for (asynchronous scheduling)."""

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        self.steps.append(scheduler_output)
        size = self.block_size
        sampled = {}
        for seq in scheduler_output.sequences:
            for offset, token in enumerate(seq.token_ids):
                if token == PENDING_TOKEN:
                    token = self.last_sampled[seq.seq_id]
                position = seq.num_computed_tokens + offset
                self.kv[seq.block_table[position // size]][position % size] = token
            if seq.samples:
                context = [
                    self.kv[seq.block_table[position // size]][position % size] for position in range(seq.context_len)
                ]
                assert -1 not in context, f"sequence {seq.seq_id} read a KV slot nothing wrote"
                digest = xxhash.xxh64_intdigest(repr(context).encode())
                sampled[seq.seq_id] = digest % self.vocab_size
        self.last_sampled = sampled
        return StepResult(sampled_token_ids=sampled, duration=self.step_duration)


def reference_outputs(prompt: list[int], max_tokens: int, vocab_size: int = 1000) -> list[int]:
    """What PagedEchoExecutor produces for a prompt when nothing goes wrong."""
    context = list(prompt)
    outputs = []
    for _ in range(max_tokens):
        token = xxhash.xxh64_intdigest(repr(context).encode()) % vocab_size
        outputs.append(token)
        context.append(token)
    return outputs


def assert_output_as_recorded(engine, request_id: str, record, expected: list[int]) -> None:
    """A request's tokens are the reference's (all of them once finished, a prefix once aborted), each with its
    time, and it has ended."""
    output = engine.output_token_ids(request_id)
    assert record.finish_time is not None and len(record.token_times) == len(output)
    if record.status == "finished":
        assert output == expected
    else:
        assert record.status == "aborted" and output == expected[: len(output)]


class PredictingExecutor:
    """A cost-model-like executor: constant tokens and durations that depend on the batch, predictable ahead."""

    token_id = 7

    def __init__(self, num_kv_blocks: int, block_size: int) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.steps: list[SchedulerOutput] = []

    def _duration(self, num_decode_seqs: int, decode_context_tokens: int, num_prefill_tokens: int) -> float:
        return 0.003 + 1e-5 * num_decode_seqs + 3.1e-7 * decode_context_tokens + 2e-6 * num_prefill_tokens

    def cuda_graph_batch_size(self, num_decode_seqs: int) -> int:
        return num_decode_seqs if num_decode_seqs <= 8 else 0

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        self.steps.append(scheduler_output)
        # The batch as a DecodeRunPredictor reads it: its features (the sequences may leave decodes out).
        features = batch_features(scheduler_output)
        prefill_tokens = features.num_prefill_tokens
        duration = self._duration(features.num_decode_seqs, features.decode_context_tokens, prefill_tokens)
        sampled = {seq.seq_id: self.token_id for seq in scheduler_output.sequences if seq.samples}
        graph = self.cuda_graph_batch_size(features.num_decode_seqs) if not prefill_tokens else 0
        return StepResult(sampled_token_ids=sampled, duration=duration, cuda_graph_batch_size=graph)

    def predict_decode_run(self, num_decode_seqs: int, decode_context_tokens: int, num_steps: int) -> list[float]:
        return [
            self._duration(num_decode_seqs, decode_context_tokens + step * num_decode_seqs, 0) for step in range(num_steps)
        ]
