"""Runs one model on one device: builds it, sizes and owns the paged KV cache, turns a SchedulerOutput into
model inputs, runs the forward (CUDA graph or eager) and samples.

Which CUDA graph a step replays is engine/graph_dispatch.py's rule; how its inputs are laid out and copied to
the device (one transfer per step) is engine/step_inputs.py's.
"""

import contextlib
import gc
import itertools

import numpy as np
import torch

from engine.attention import AttentionMetadata, load_backend, resolve_backend_name
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, MixedStepGraphs
from engine.distributed import all_reduce_min, tp_rank, tp_size
from engine.graph_dispatch import GraphDispatch, one_token_per_row, resolve_mixed_cuda_graphs
from engine.layers.fusion import enable_fusion
from engine.loader import LOAD_FORMATS, checkpoint_shapes, dummy_tensors, load_weights, safetensors_tensors
from engine.model_config import ModelConfig, is_preset, load_model_config, resolve_model_path
from engine.models import attention_features, model_class
from engine.logprobs import compute_logprobs, to_token_logprobs
from engine.sampler import Sampler, SamplingTensors
from engine.scheduler_output import PENDING_TOKEN, SchedulerOutput, TokenLogprobs
from engine.step_inputs import (
    StagingBuffer,
    StepInputs,
    arrays_of,
    fixed_layout,
    prepare_decode,
    prepare_prefill,
    prepare_prompt_logprobs,
    prepare_sample,
)

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """The weights' dtype: "auto" is the checkpoint's on CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return _DTYPES.get(config.torch_dtype, torch.bfloat16) if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class PendingStep:
    """A launched step's samples, on their way to the host (and the log-probabilities of requests that ask)."""

    def __init__(self, tokens: torch.Tensor | None, sampled_ids: list[int], graph_size: int,
                 host: torch.Tensor | None, on_cuda: bool, sample_logprobs=None, prompt_logprobs=None) -> None:
        """sample_logprobs: (compute_logprobs' tensors, their rows' seq ids, top tokens wanted per row);
        prompt_logprobs: (compute_logprobs' tensors, the step's PromptLogprobPlan)."""
        self.sampled_ids = sampled_ids
        self.graph_size = graph_size
        self._tokens = tokens
        self._host = host
        self._sample_logprobs = sample_logprobs
        self._prompt_logprobs = prompt_logprobs
        self.logprobs: dict[int, TokenLogprobs] | None = None
        """After result(): StepResult.logprobs."""
        self.prompt_logprobs: dict[int, tuple[int, list[TokenLogprobs]]] | None = None
        """After result(): StepResult.prompt_logprobs."""
        self._event = None
        self._work_started = self._work_ended = None
        self.device_seconds: float | None = None
        """After result(), where the runner times device work: from the step's upload to its end."""
        if on_cuda:
            # Every step is waited for, sampling or not: the staging buffers are reused on the
            # promise that the step before last has finished (and durations include the GPU work).
            self._event = torch.cuda.Event()
            self._event.record()

    def time_from(self, started) -> None:
        """Time the device's work for this step from `started` (a timing event recorded before its upload)."""
        self._work_started = started
        self._work_ended = torch.cuda.Event(enable_timing=True)
        self._work_ended.record()

    def result(self) -> tuple[dict[int, int], int]:
        """(sampled token per seq id, CUDA-graph batch size or 0), waiting for this step only."""
        if self._event is not None:
            self._event.synchronize()
        if self._work_ended is not None:
            self._work_ended.synchronize()
            self.device_seconds = self._work_started.elapsed_time(self._work_ended) / 1e3
        if self._prompt_logprobs is not None:
            computed, plan = self._prompt_logprobs
            entries = to_token_logprobs(plan.targets.tolist(), computed,
                                        [count for _, _, num, count in plan.spans for _ in range(num)])
            self.prompt_logprobs, start = {}, 0
            for seq_id, first_index, num, _ in plan.spans:
                self.prompt_logprobs[seq_id] = (first_index, entries[start:start + num])
                start += num
        if self._tokens is None:
            return {}, self.graph_size
        values = self._host.tolist() if self._host is not None else self._tokens.tolist()
        if self._sample_logprobs is not None:
            computed, seq_ids, counts = self._sample_logprobs
            rows = {seq_id: row for row, seq_id in enumerate(self.sampled_ids)}
            entries = to_token_logprobs([values[rows[seq_id]] for seq_id in seq_ids], computed, counts)
            self.logprobs = dict(zip(seq_ids, entries))
        return dict(zip(self.sampled_ids, values)), self.graph_size


class ModelRunner:
    """One rank's model, KV cache, CUDA graphs and sampler."""

    def __init__(
        self,
        model: str,
        engine_config: EngineConfig,
        *,
        dtype: str = "auto",
        device: str = "cuda",
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        attention_backend: str = "auto",
        load_format: str = "auto",
        seed: int = 0,
        cpu_kv_cache_bytes: int = 1 << 30,
        mixed_cuda_graphs: bool | None = None,
    ) -> None:
        """mixed_cuda_graphs: also run steps with prompt chunks as CUDA graphs (MixedStepGraphs; triton
        backend), not only decode-only steps. None (the default): on with the triton backend at TP 1 whenever
        CUDA graphs are on."""
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format {load_format!r} is unknown; choose one of {', '.join(LOAD_FORMATS)}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.engine_config = engine_config
        self.model_config = config = load_model_config(model)
        self.dtype = resolve_dtype(dtype, config, self.device)
        self.block_size = engine_config.block_size
        self.max_model_len = engine_config.max_model_len
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.rank = tp_rank()
        self.backend_name = resolve_backend_name(attention_backend, self.device, self.block_size)
        backend = load_backend(self.backend_name)
        self.qkv_bias, self.qk_norm = attention_features(config.architecture, config.attention_bias)

        if self.device.type == "cuda":
            enable_fusion()
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(config.architecture)(config, self.max_model_len, backend)
        finally:
            torch.set_default_dtype(previous_dtype)
        self.model.eval()
        self._load_weights(model, load_format, seed)

        self.sampler = Sampler(seed, self.device)
        self._block_table_rows: dict[int, np.ndarray] = {}
        self.staging = StagingBuffer(self.device)
        self._last_tokens = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._last_rows: dict[int, int] = {}
        """seq id -> row of _last_tokens, the samples of the step launched last (PENDING_TOKEN's values)."""
        self._token_turn = 0
        self.time_device_work = False
        """On a GPU, time each step's device work with CUDA events (PendingStep.device_seconds): the operator
        profile's host-step probe sets it to tell the host's time from the device's."""
        self._work_started = None
        self._token_buffers = [
            torch.empty(engine_config.max_num_seqs, dtype=torch.int64, pin_memory=self.device.type == "cuda")
            for _ in range(2)
        ]
        self.num_kv_heads = config.num_key_value_heads // tp_size()
        self.bytes_per_block = (
            2 * config.num_hidden_layers * self.block_size * self.num_kv_heads * config.head_dim * self.dtype.itemsize
        )
        num_blocks = engine_config.num_kv_blocks
        if num_blocks is None:
            if self.device.type == "cuda":
                num_blocks = self._profile_num_blocks(gpu_memory_utilization)
            else:
                most_needed = engine_config.max_num_seqs * self.max_blocks_per_seq
                num_blocks = min(cpu_kv_cache_bytes // self.bytes_per_block, most_needed)
            num_blocks = all_reduce_min(num_blocks, self.device)
        if num_blocks < 1:
            raise RuntimeError(
                f"no memory left for the KV cache on {self.device} (one block needs {self.bytes_per_block} bytes); "
                "raise gpu_memory_utilization, lower max_num_batched_tokens, or use a smaller model"
            )
        self.num_kv_blocks = int(num_blocks)
        self.kv_cache = self._allocate_kv_cache(self.num_kv_blocks)

        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedStepGraphs | None = None
        self.dispatch = GraphDispatch()
        """Which of the captured graphs each step replays (none yet: eager)."""
        self.mixed_cuda_graphs = False
        """Whether steps with prompt chunks run as CUDA graphs (the option resolved; stays after release_graphs)."""
        if self.device.type == "cuda":
            self._warm_up_kernels()
        if self.device.type == "cuda" and not enforce_eager:
            self.mixed_cuda_graphs = resolve_mixed_cuda_graphs(mixed_cuda_graphs, self.backend_name, tp_size())
            dispatch = GraphDispatch.for_engine(engine_config.max_num_seqs, engine_config.max_num_batched_tokens,
                                                cuda_graphs=True, mixed=self.mixed_cuda_graphs)
            self.graphs = DecodeGraphs(self.model, dispatch.decode_sizes, self.max_blocks_per_seq, self.device)
            pool = self.graphs.capture()
            if dispatch.mixed_sizes:
                from engine.kernels.prefill_attention import prefill_query_tile

                attention = self.model.attention_layers()[0]
                block_q = prefill_query_tile(attention.num_heads, attention.num_kv_heads, attention.head_dim)
                self.mixed_graphs = MixedStepGraphs(
                    self.model, dispatch.mixed_sizes, dispatch.max_mixed_seqs, self.max_blocks_per_seq, block_q,
                    self.device,
                )
                # The warm-up's blocks cached by the allocator would sit beside the graphs' pool: give them back.
                torch.cuda.empty_cache()
                self.mixed_graphs.capture(pool)
            self.dispatch = dispatch

    def release_graphs(self) -> None:
        """Free the CUDA graphs. Graphs with captured NCCL collectives hold on to the communicator: at tensor
        parallelism destroy_process_group() waits for them forever, so they go first."""
        if self.graphs is None and self.mixed_graphs is None:
            return
        torch.cuda.synchronize(self.device)
        self.graphs = self.mixed_graphs = None
        self.dispatch = GraphDispatch()
        gc.collect()
        torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def eager_prompt_steps(self):
        """Within: steps with prompt chunks run eagerly although their graphs stay captured (profiling times a
        batch both ways, so one cost model predicts the engine with and without mixed-step graphs)."""
        dispatch, self.dispatch = self.dispatch, self.dispatch.without_mixed_graphs()
        try:
            yield
        finally:
            self.dispatch = dispatch

    @property
    def cuda_graph_batch_sizes(self) -> list[int]:
        return list(self.dispatch.decode_sizes)

    def _load_weights(self, model: str, load_format: str, seed: int) -> None:
        if load_format == "auto":
            load_format = "dummy" if is_preset(model) else "safetensors"
        if load_format == "dummy":
            shapes = checkpoint_shapes(self.model_config, self.qkv_bias, self.qk_norm)
            tensors = dummy_tensors(shapes, seed, self.device, self.dtype)
            load_weights(self.model, tensors, f"dummy weights of {model}")
        else:
            if is_preset(model):
                raise ValueError(f"model {model!r} is a bundled preset without weights; use load_format='dummy'")
            folder = resolve_model_path(model).parent
            load_weights(self.model, safetensors_tensors(folder), str(folder))

    def _allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        """[2, layers, blocks, block_size, kv_heads, head_dim], each layer's attention given its two slices."""
        config = self.model_config
        shape = (2, config.num_hidden_layers, num_blocks, self.block_size, self.num_kv_heads, config.head_dim)
        kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for index, attention in enumerate(self.model.attention_layers()):
            attention.k_cache = kv_cache[0, index]
            attention.v_cache = kv_cache[1, index]
        return kv_cache

    @torch.inference_mode()
    def _profile_num_blocks(self, gpu_memory_utilization: float) -> int:
        """Blocks that fit after the peak of a warm-up forward at the largest batch (vLLM's profiling)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free_before, total = torch.cuda.mem_get_info(self.device)
        allocated_before = torch.cuda.memory_allocated(self.device)
        num_tokens = self.engine_config.max_num_batched_tokens
        seq_len = min(self.max_model_len, num_tokens)
        lengths: list[int] = []
        while num_tokens > 0 and len(lengths) < self.engine_config.max_num_seqs:
            lengths.append(min(seq_len, num_tokens))
            num_tokens -= lengths[-1]
        blocks_needed = sum(-(-n // self.block_size) for n in lengths)
        scratch = self._allocate_kv_cache(blocks_needed)
        scratch_bytes = scratch.numel() * scratch.element_size()
        next_block = 0
        ids, positions, slots, tables = [], [], [], []
        for n in lengths:
            blocks = list(range(next_block, next_block + -(-n // self.block_size)))
            next_block += len(blocks)
            ids.append(np.zeros(n, np.int32))
            pos = np.arange(n, dtype=np.int32)
            positions.append(pos)
            slots.append((np.asarray(blocks, np.int32)[pos // self.block_size] * self.block_size
                          + pos % self.block_size).astype(np.int32))
            tables.append(blocks)
        width = max(len(t) for t in tables)
        table = np.zeros((len(tables), width), np.int32)
        for row, blocks in enumerate(tables):
            table[row, :len(blocks)] = blocks
        cu = np.zeros(len(lengths) + 1, np.int32)
        cu[1:] = np.cumsum(lengths)
        dev = self.staging.upload({"input_ids": np.concatenate(ids), "positions": np.concatenate(positions),
                                   "slot_mapping": np.concatenate(slots), "seq_lens": np.asarray(lengths, np.int32),
                                   "cu_seqlens_q": cu, "block_tables": table})
        metadata = AttentionMetadata(slot_mapping=dev["slot_mapping"], seq_lens=dev["seq_lens"],
                                     block_tables=dev["block_tables"], cu_seqlens_q=dev["cu_seqlens_q"])
        hidden = self.model(dev["input_ids"], dev["positions"], metadata)
        # The sampler's peak at the most rows a step can sample, with every filter on.
        rows = self.engine_config.max_num_seqs
        logits = self.model.compute_logits(hidden[:1].expand(rows, -1).contiguous())
        full = torch.ones(rows, device=self.device)
        self.sampler(logits, SamplingTensors(temperatures=full * 0.5, top_k=full.int() * 5, top_p=full * 0.9))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del scratch, hidden, logits
        for attention in self.model.attention_layers():
            attention.k_cache = attention.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        activation_peak = peak - allocated_before - scratch_bytes
        used_before = total - free_before
        budget = total * gpu_memory_utilization - used_before - activation_peak
        return max(0, int(budget // self.bytes_per_block))

    def _warm_up_kernels(self) -> None:
        """Run the eager paths once per class of shapes Triton specializes on (a count of 1, a multiple
        of 16, anything else), so no kernel compiles in the middle of serving."""
        from engine.sampling_params import SamplingParams
        from engine.scheduler_output import ScheduledSequence

        greedy = SamplingParams(temperature=0)
        # The sampler has two paths (plain temperature on model-dtype logits, top-k/top-p on float32
        # ones): warm both, on every batch shape below.
        random_kinds = (SamplingParams(temperature=0.5), SamplingParams(temperature=0.5, top_p=0.9, seed=1))
        capacity = self.num_kv_blocks * self.block_size
        # New tokens per sequence of each warm-up batch; the last three mix one-token rows with longer ones.
        shapes = ((17,), (32,), (1,), (9, 9), (8, 8), (1,) * 16, (3,) * 16, (2,) * 17, (1,) * 3,
                  (1, 5), (1,) * 16 + (16,), (1, 1, 1, 33))
        for lengths, random in itertools.product(shapes, random_kinds):
            if sum(max(n, self.block_size) for n in lengths) > capacity or len(lengths) > self.engine_config.max_num_seqs:
                continue
            seqs, next_block = [], 0
            for index, tokens in enumerate(lengths):
                blocks = -(-tokens // self.block_size)
                seqs.append(ScheduledSequence(index, [1] * tokens, 0, list(range(next_block, next_block + blocks)),
                                              tokens == 1, True, 0, greedy if index % 2 else random))
                next_block += blocks
            self.execute(SchedulerOutput(0, seqs, finished_seq_ids=list(range(len(lengths)))))
        self._block_table_rows.clear()
        self._warm_up_decode_widths()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _warm_up_decode_widths(self) -> None:
        """Eager mixed steps run the decode kernel on tables as wide as the batch's longest sequence, and its
        partition count (a power of two per compiled variant) follows the width: compile each now."""
        if self.backend_name != "triton":
            return
        attention = self.model.attention_layers()[0]
        q = torch.zeros(1, attention.num_heads, attention.head_dim, dtype=self.dtype, device=self.device)
        seq_lens = torch.ones(1, dtype=torch.int32, device=self.device)
        widths = {self.max_blocks_per_seq}
        width = 1
        while width < self.max_blocks_per_seq:
            widths.add(width)
            width *= 2
        for width in sorted(widths):
            tables = torch.zeros(1, width, dtype=torch.int32, device=self.device)
            attention.backend.paged_decode_attention(q, attention.k_cache, attention.v_cache, seq_lens, tables,
                                                     attention.scale)

    def prepare(self, scheduler_output: SchedulerOutput) -> StepInputs:
        """A step's inputs on the device (one host-to-device copy), laid out for the graph it replays, if any."""
        seqs = scheduler_output.sequences
        num_seqs = len(seqs)
        num_tokens = sum(len(seq.token_ids) for seq in seqs)
        decode_graph_size = mixed_graph_size = 0
        if one_token_per_row(num_tokens, num_seqs):
            decode_graph_size = self.dispatch.decode_size(num_seqs)
            host = prepare_decode(seqs, decode_graph_size or num_seqs, self.block_size, self._block_table_rows)
            last_token_rows = token_starts = np.arange(num_seqs, dtype=np.int32)
            num_single = num_seqs
        else:
            # One-token rows first: the attention backend may hand them to its decode kernel as a block.
            singles = [seq for seq in seqs if len(seq.token_ids) == 1]
            num_single = len(singles)
            if num_single:
                seqs = singles + [seq for seq in seqs if len(seq.token_ids) != 1]
            host = prepare_prefill(seqs, num_single, self.block_size)
            last_token_rows = host.cu_seqlens_q[1:] - 1
            token_starts = host.cu_seqlens_q[:-1]
            mixed_graph_size = self.dispatch.mixed_size(num_tokens, num_seqs)
            if mixed_graph_size:
                host = fixed_layout(host, mixed_graph_size, self.mixed_graphs)
        sample, sampled_ids = prepare_sample(seqs, last_token_rows, self.engine_config.eos_token_ids,
                                             self._pending_reader())
        arrays = arrays_of(host) | sample.upload_arrays()
        prompt_plan = prepare_prompt_logprobs(seqs, token_starts) if scheduler_output.has_token_history else None
        if prompt_plan is not None:
            arrays["prompt_logprob_rows"] = prompt_plan.rows
            arrays["prompt_logprob_targets"] = prompt_plan.targets
        # Inputs still on the device (the previous step's samples): only one-token rows, which lead.
        pending_rows = np.flatnonzero(host.input_ids[:num_single] == PENDING_TOKEN).astype(np.int32)
        if pending_rows.size:
            last_rows = self._last_rows
            arrays["pending_rows"] = pending_rows
            arrays["pending_sources"] = np.asarray([last_rows[seqs[row].seq_id] for row in pending_rows], np.int32)
        if self.time_device_work and self.device.type == "cuda":
            self._work_started = torch.cuda.Event(enable_timing=True)
            self._work_started.record()
        dev = self.staging.upload(arrays)
        if pending_rows.size:
            pending_tokens = self._last_tokens[dev["pending_sources"].long()].to(torch.int32)
            dev["input_ids"][dev["pending_rows"].long()] = pending_tokens
        return StepInputs(dev["input_ids"], dev["positions"], host.metadata(dev), dev["logit_rows"],
                          sample.tensors(dev), sampled_ids, decode_graph_size, mixed_graph_size,
                          sample.logprob_counts, prompt_plan, dev.get("prompt_logprob_rows"),
                          dev.get("prompt_logprob_targets"))

    def _pending_reader(self):
        """seq id -> the token it sampled in the step launched last, read from the device once per step and only
        if asked (the logits processors of a request with a token history; this waits for that step)."""
        values = None

        def read(seq_id: int) -> int:
            nonlocal values
            if values is None:
                values = self._last_tokens.tolist()
            return values[self._last_rows[seq_id]]

        return read

    def launch(self, scheduler_output: SchedulerOutput) -> "PendingStep":
        """Queue one step on the device and return at once; the PendingStep gives its samples.

        A PENDING_TOKEN input is the token its sequence sampled in the step launched just before, taken
        from the device: the next step can be queued before this one's samples reach the host.
        """
        pending = self._launch(scheduler_output)
        if self._work_started is not None:
            pending.time_from(self._work_started)
            self._work_started = None
        return pending

    @torch.inference_mode()
    def _launch(self, scheduler_output: SchedulerOutput) -> "PendingStep":
        for seq_id in scheduler_output.finished_seq_ids:
            self._block_table_rows.pop(seq_id, None)
        if not scheduler_output.sequences:
            return PendingStep(None, [], 0, None, self.device.type == "cuda")
        step = self.prepare(scheduler_output)
        sampled_ids = step.sampled_ids
        on_cuda = self.device.type == "cuda"
        if step.decode_graph_size:
            graph_size = step.decode_graph_size
            all_logits = self.graphs.replay(graph_size, step.input_ids, step.positions, step.metadata)
            logits = all_logits[step.logit_rows] if len(sampled_ids) != graph_size else all_logits
            prompt_logprobs = self._score_prompt(step, lambda rows: all_logits[rows])
        else:
            hidden = self.hidden_states(step)
            graph_size = step.mixed_graph_size
            prompt_logprobs = self._score_prompt(step, lambda rows: self.model.compute_logits(hidden[rows]))
            if not sampled_ids:
                return PendingStep(None, [], graph_size, None, on_cuda, prompt_logprobs=prompt_logprobs)
            logits = self.model.compute_logits(hidden[step.logit_rows])
        if not sampled_ids or self.rank != 0:
            return PendingStep(None, [], graph_size, None, on_cuda, prompt_logprobs=prompt_logprobs)
        tokens = self.sampler(logits, step.sampling)
        sample_logprobs = None
        if step.sampling.logprob_rows is not None:
            # From the raw logits, as vLLM's default logprobs mode: before penalties and temperature.
            rows = step.sampling.logprob_rows
            num_top = step.sampling.num_logprobs
            num_top = logits.shape[-1] if num_top == -1 else min(num_top, logits.shape[-1])
            computed = compute_logprobs(logits[rows], tokens[rows], num_top)
            seq_ids = [sampled_ids[row] for row in rows.tolist()]
            sample_logprobs = (computed, seq_ids, step.logprob_counts)
        self._last_tokens = tokens
        self._last_rows = {seq_id: row for row, seq_id in enumerate(sampled_ids)}
        host = None
        if self.device.type == "cuda":
            # Copy behind this step's kernels, before any later step's: the event marks exactly its end.
            self._token_turn ^= 1
            host = self._token_buffers[self._token_turn][:len(sampled_ids)]
            host.copy_(tokens, non_blocking=True)
        return PendingStep(tokens, sampled_ids, graph_size, host, on_cuda, sample_logprobs, prompt_logprobs)

    def _score_prompt(self, step: StepInputs, logits_of):
        """The prompt logprobs this step computes, or None: logits_of(rows) gives the logits of rows of the step's
        hidden states, on every rank (the LM head gathers over ranks); rank 0 scores them, max_num_seqs rows at a
        time, which bounds the memory as the sampler's own peak does."""
        plan = step.prompt_logprobs
        if plan is None:
            return None
        vocab_size = self.model_config.vocab_size
        num_top = max(vocab_size if count == -1 else count for *_, count in plan.spans)
        chunk = self.engine_config.max_num_seqs
        parts = []
        for start in range(0, len(plan.rows), chunk):
            rows = step.prompt_logprob_rows[start:start + chunk].long()
            logits = logits_of(rows)
            if self.rank == 0:
                parts.append(compute_logprobs(logits, step.prompt_logprob_targets[start:start + chunk], num_top))
        if self.rank != 0:
            return None
        return tuple(torch.cat(tensors) for tensors in zip(*parts)), plan

    def hidden_states(self, step: StepInputs) -> torch.Tensor:
        """The model's forward (no LM head) over a prepared step: in its mixed-step CUDA graph when prepared for
        one, else eagerly."""
        if step.mixed_graph_size:
            return self.mixed_graphs.replay(step.mixed_graph_size, step.input_ids, step.positions, step.metadata)
        return self.model(step.input_ids, step.positions, step.metadata)

    def execute(self, scheduler_output: SchedulerOutput) -> tuple[dict[int, int], int]:
        """Run one step; (sampled token per seq id (rank 0 only), CUDA-graph batch size or 0)."""
        return self.launch(scheduler_output).result()
