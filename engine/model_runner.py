"""Runs one model on one device: builds it, sizes and owns the paged KV cache, turns a SchedulerOutput into
model inputs, runs the forward (CUDA graph or eager) and samples.

Inputs for a step are packed into one pinned int32 host buffer and copied to the device in one transfer.
"""

import contextlib
import gc
import itertools
import math
import time

import numpy as np
import torch

from engine.attention import AttentionMetadata, load_backend, resolve_backend_name
from engine.config import EngineConfig
from engine.cuda_graphs import (
    DecodeGraphs,
    MixedStepGraphs,
    graph_batch_sizes,
    mixed_step_token_sizes,
    resolve_mixed_cuda_graphs,
)
from engine.distributed import all_reduce_min, tp_rank, tp_size
from engine.layers.fusion import enable_fusion
from engine.loader import LOAD_FORMATS, checkpoint_shapes, dummy_tensors, load_weights, safetensors_tensors
from engine.model_config import ModelConfig, is_preset, load_model_config, resolve_model_path
from engine.models import attention_features, model_class
from engine.sampler import Sampler, SamplingTensors, seed_key
from engine.scheduler_output import PENDING_TOKEN, SchedulerOutput

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


_ALIGN = 16  # int32 elements: 64 bytes


class _Staging:
    """A growable pinned host buffer and its device twin, for one host-to-device copy per step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._turn = 0
        self._allocate(1 << 16)

    def _allocate(self, capacity: int) -> None:
        # Two host buffers taken in turn: with asynchronous scheduling the next step's inputs are written
        # while the copy of this step's may not have run yet. (The step before that one has finished.)
        self.hosts = [torch.empty(capacity, dtype=torch.int32, pin_memory=self.pinned) for _ in range(2)]
        self.host_nps = [host.numpy() for host in self.hosts]
        self.device_buffer = torch.empty(capacity, dtype=torch.int32, device=self.device) if self.pinned else None

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Copy int32/float32 numpy arrays to the device in one transfer; device views in the same order."""
        # Every array starts on a 64-byte boundary: Triton specializes kernels on pointer alignment, so
        # unaligned views would compile new kernel variants in the middle of a run.
        sizes = [-(-a.size // _ALIGN) * _ALIGN for a in arrays]
        total = sum(sizes)
        if total > self.hosts[0].numel():
            if self.pinned:
                torch.cuda.synchronize(self.device)  # copies from the old buffers may be queued
            self._allocate(1 << math.ceil(math.log2(total)))
        self._turn ^= 1
        host, host_np = self.hosts[self._turn], self.host_nps[self._turn]
        offsets = []
        offset = 0
        for array, size in zip(arrays, sizes):
            flat = array.reshape(-1)
            target = host_np[offset:offset + flat.size]
            if flat.dtype == np.float32:
                target.view(np.float32)[:] = flat
            else:
                target[:] = flat
            offsets.append(offset)
            offset += size
        if self.pinned:
            self.device_buffer[:total].copy_(host[:total], non_blocking=True)
            source = self.device_buffer
        else:
            # The CPU tensor itself: clone so the next step's writes cannot alias this step's inputs.
            source = host[:total].clone()
        views = []
        for array, start in zip(arrays, offsets):
            view = source[start:start + array.size]
            if array.dtype == np.float32:
                view = view.view(torch.float32)
            views.append(view.view(array.shape))
        return views


class PendingStep:
    """A launched step's samples, on their way to the host."""

    def __init__(self, tokens: torch.Tensor | None, sampled_ids: list[int], graph_size: int,
                 host: torch.Tensor | None, on_cuda: bool) -> None:
        self.sampled_ids = sampled_ids
        self.graph_size = graph_size
        self._tokens = tokens
        self._host = host
        self._event = None
        if on_cuda:
            # Every step is waited for, sampling or not: the staging buffers are reused on the
            # promise that the step before last has finished (and durations include the GPU work).
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> tuple[dict[int, int], int]:
        """(sampled token per seq id, CUDA-graph batch size or 0), waiting for this step only."""
        if self._event is not None:
            self._event.synchronize()
        if self._tokens is None:
            return {}, self.graph_size
        values = self._host.tolist() if self._host is not None else self._tokens.tolist()
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
        self.staging = _Staging(self.device)
        self._last_tokens = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._last_rows: dict[int, int] = {}
        """seq id -> row of _last_tokens, the samples of the step launched last (PENDING_TOKEN's values)."""
        self._token_turn = 0
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
        self.mixed_cuda_graphs = False
        """Whether steps with prompt chunks run as CUDA graphs (the option resolved; stays after release_graphs)."""
        if self.device.type == "cuda":
            self._warm_up_kernels()
        if self.device.type == "cuda" and not enforce_eager:
            sizes = graph_batch_sizes(engine_config.max_num_seqs)
            self.graphs = DecodeGraphs(self.model, sizes, self.max_blocks_per_seq, self.device)
            pool = self.graphs.capture()
            self.mixed_cuda_graphs = resolve_mixed_cuda_graphs(mixed_cuda_graphs, self.backend_name, tp_size())
            if self.mixed_cuda_graphs:
                from engine.kernels.prefill_attention import prefill_query_tile

                attention = self.model.attention_layers()[0]
                block_q = prefill_query_tile(attention.num_heads, attention.num_kv_heads, attention.head_dim)
                self.mixed_graphs = MixedStepGraphs(
                    self.model, mixed_step_token_sizes(engine_config.max_num_batched_tokens),
                    engine_config.max_num_seqs, self.max_blocks_per_seq, block_q, self.device,
                )
                # The warm-up's blocks cached by the allocator would sit beside the graphs' pool: give them back.
                torch.cuda.empty_cache()
                self.mixed_graphs.capture(pool)

    def release_graphs(self) -> None:
        """Free the CUDA graphs. Graphs with captured NCCL collectives hold on to the communicator: at tensor
        parallelism destroy_process_group() waits for them forever, so they go first."""
        if self.graphs is None and self.mixed_graphs is None:
            return
        torch.cuda.synchronize(self.device)
        self.graphs = self.mixed_graphs = None
        gc.collect()
        torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def eager_prompt_steps(self):
        """Within: steps with prompt chunks run eagerly although their graphs stay captured (profiling times a
        batch both ways, so one cost model predicts the engine with and without mixed-step graphs)."""
        graphs, self.mixed_graphs = self.mixed_graphs, None
        try:
            yield
        finally:
            self.mixed_graphs = graphs

    @property
    def cuda_graph_batch_sizes(self) -> list[int]:
        return list(self.graphs.batch_sizes) if self.graphs is not None else []

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
        dev = self.staging.upload([np.concatenate(ids), np.concatenate(positions), np.concatenate(slots),
                                   np.asarray(lengths, np.int32), cu, table])
        metadata = AttentionMetadata(slot_mapping=dev[2], seq_lens=dev[3], block_tables=dev[5], cu_seqlens_q=dev[4])
        hidden = self.model(dev[0], dev[1], metadata)
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

    def _prepare(self, scheduler_output: SchedulerOutput):
        """Device inputs for a step: (ids, positions, metadata, logit rows, sampling tensors, sampled seq ids, graph size)."""
        seqs = scheduler_output.sequences
        block_size = self.block_size
        num_seqs = len(seqs)
        single_token = all(len(seq.token_ids) == 1 for seq in seqs)
        graph_size = mixed_size = None
        if single_token and self.graphs is not None:
            graph_size = self.graphs.padded_size(num_seqs)
        rows = graph_size or num_seqs
        width = max(len(seq.block_table) for seq in seqs)
        block_tables = np.zeros((rows, width), np.int32)
        seq_lens = np.zeros(rows, np.int32)
        sampled_ids: list[int] = []
        sampled_params = []
        logit_rows: list[int] = []
        if single_token:
            # The hot path (pure decode): list comprehensions, then one array per input.
            ids = np.zeros(rows, np.int32)
            positions = np.zeros(rows, np.int32)
            slots = np.full(rows, -1, np.int32)
            position_list = [seq.num_computed_tokens for seq in seqs]
            ids[:num_seqs] = [seq.token_ids[0] for seq in seqs]
            positions[:num_seqs] = position_list
            slots[:num_seqs] = [seq.block_table[p // block_size] * block_size + p % block_size
                                for seq, p in zip(seqs, position_list)]
            seq_lens[:num_seqs] = positions[:num_seqs] + 1
            rows_cache = self._block_table_rows
            table_rows = []
            for seq in seqs:
                table = seq.block_table
                cached = rows_cache.get(seq.seq_id)
                # Tables only grow while a sequence runs (a preempted one is released first), so
                # converting again is needed only when a block was added.
                if cached is None or cached.size != len(table):
                    cached = rows_cache[seq.seq_id] = np.asarray(table, np.int32)
                table_rows.append(cached)
            # One scatter of all rows: row-major order of the mask is the concatenation's order.
            lengths = np.fromiter(map(len, table_rows), np.int32, num_seqs)
            block_tables[:num_seqs][np.arange(width) < lengths[:, None]] = np.concatenate(table_rows)
            if all(seq.samples for seq in seqs):  # decodes always sample
                sampled_ids = [seq.seq_id for seq in seqs]
                sampled_params = [(seq.sampling_params, seq.num_output_tokens) for seq in seqs]
                logit_rows = list(range(num_seqs))
            else:
                for row, seq in enumerate(seqs):
                    if seq.samples:
                        sampled_ids.append(seq.seq_id)
                        sampled_params.append((seq.sampling_params, seq.num_output_tokens))
                        logit_rows.append(row)
            arrays = [ids, positions, slots, seq_lens, block_tables]
        else:
            # One-token rows first: the attention backend may hand them to its decode kernel as a block.
            singles = [seq for seq in seqs if len(seq.token_ids) == 1]
            num_single = len(singles)
            if num_single:
                seqs = singles + [seq for seq in seqs if len(seq.token_ids) != 1]
            max_query_len = max(len(seq.token_ids) for seq in seqs)
            id_parts, position_parts, slot_parts = [], [], []
            cu = np.zeros(num_seqs + 1, np.int32)
            total = 0
            for row, seq in enumerate(seqs):
                start, count = seq.num_computed_tokens, len(seq.token_ids)
                table = np.asarray(seq.block_table, np.int32)
                pos = np.arange(start, start + count, dtype=np.int32)
                id_parts.append(np.asarray(seq.token_ids, np.int32))
                position_parts.append(pos)
                slot_parts.append(table[pos // block_size] * block_size + pos % block_size)
                seq_lens[row] = start + count
                block_tables[row, :len(table)] = table
                total += count
                cu[row + 1] = total
                if seq.samples:
                    sampled_ids.append(seq.seq_id)
                    sampled_params.append((seq.sampling_params, seq.num_output_tokens))
                    logit_rows.append(total - 1)
            arrays = [np.concatenate(id_parts), np.concatenate(position_parts), np.concatenate(slot_parts),
                      seq_lens, block_tables, cu]
            if self.mixed_graphs is not None:
                mixed_size = self.mixed_graphs.padded_tokens(total, num_seqs)
                if mixed_size is not None:
                    arrays = self._fixed_layout(arrays, mixed_size, num_single)
        sampling_arrays, sampling_layout = self._sampling_arrays(sampled_params)
        arrays += [np.asarray(logit_rows, np.int32)] + sampling_arrays
        # Inputs still on the device (the previous step's samples): only one-token rows, which lead.
        num_leading = num_seqs if single_token else num_single
        pending_rows = np.flatnonzero(arrays[0][:num_leading] == PENDING_TOKEN).astype(np.int32)
        if pending_rows.size:
            last_rows = self._last_rows
            arrays += [pending_rows, np.asarray([last_rows[seqs[row].seq_id] for row in pending_rows], np.int32)]
        dev = self.staging.upload(arrays)
        if pending_rows.size:
            dev[0][dev[-2].long()] = self._last_tokens[dev[-1].long()].to(torch.int32)
        base = 5 if single_token else 6 if mixed_size is None else 11
        sampling = self._sampling_tensors(dev[base + 1:], sampling_layout)
        if single_token:
            metadata = AttentionMetadata(slot_mapping=dev[2], seq_lens=dev[3], block_tables=dev[4])
        elif mixed_size is None:
            metadata = AttentionMetadata(slot_mapping=dev[2], seq_lens=dev[3], block_tables=dev[4], cu_seqlens_q=dev[5],
                                         max_query_len=max_query_len, num_single=num_single)
        else:
            metadata = AttentionMetadata(slot_mapping=dev[2], seq_lens=dev[3], block_tables=dev[4], cu_seqlens_q=dev[5],
                                         decode_seq_lens=dev[6], tile_map=(dev[7][0], dev[7][1]),
                                         decode_work=(dev[8], dev[9], dev[10]))
        return dev[0], dev[1], metadata, dev[base], sampling, sampled_ids, graph_size, mixed_size

    def _fixed_layout(self, arrays: list[np.ndarray], num_tokens: int, num_single: int) -> list[np.ndarray]:
        """A mixed step's host arrays padded for MixedStepGraphs: tokens to num_tokens (slot -1), sequences to
        max_seqs rows (context 0), plus the one-token rows' contexts, the prefill tile map and the decode work
        map (its map, each row's first entry, its partition size)."""
        from engine.kernels.decode_attention import decode_work_map
        from engine.kernels.prefill_attention import prefill_tile_map

        ids, positions, slots, seq_lens, block_tables, cu = arrays
        graphs = self.mixed_graphs
        total, num_seqs = len(ids), len(seq_lens)
        pad = num_tokens - total
        if pad:
            ids = np.concatenate([ids, np.zeros(pad, np.int32)])
            positions = np.concatenate([positions, np.zeros(pad, np.int32)])
            slots = np.concatenate([slots, np.full(pad, -1, np.int32)])
        all_seq_lens = np.zeros(graphs.max_seqs, np.int32)
        all_seq_lens[:num_seqs] = seq_lens
        decode_seq_lens = np.zeros(graphs.max_seqs, np.int32)
        decode_seq_lens[:num_single] = seq_lens[:num_single]
        all_cu = np.full(graphs.max_seqs + 1, total, np.int32)
        all_cu[:num_seqs + 1] = cu
        tile_map = prefill_tile_map(np.diff(cu), graphs.block_q, graphs.tile_capacity(num_tokens), first_seq=num_single)
        work_map, starts, partition_size = decode_work_map(decode_seq_lens, graphs.work_capacity(num_tokens))
        return [ids, positions, slots, all_seq_lens, block_tables, all_cu, decode_seq_lens, tile_map, work_map, starts,
                np.asarray([partition_size], np.int32)]

    @staticmethod
    def _sampling_arrays(sampled_params) -> tuple[list[np.ndarray], tuple[bool, bool, bool, bool]]:
        """Host arrays of the per-row sampling settings, only for the features some row uses."""
        params = [p for p, _ in sampled_params]
        any_random = any(not p.greedy for p in params)
        if not any_random:
            return [], (False, False, False, False)
        temperatures = np.asarray([0.0 if p.greedy else p.temperature for p in params], np.float32)
        arrays = [temperatures]
        any_top_k = any(p.top_k > 0 and not p.greedy for p in params)
        any_top_p = any(p.top_p < 1.0 and not p.greedy for p in params)
        seeded = [row for row, p in enumerate(params) if p.seed is not None and not p.greedy]
        if any_top_k:
            arrays.append(np.asarray([max(p.top_k, 0) for p in params], np.int32))
        if any_top_p:
            arrays.append(np.asarray([p.top_p for p in params], np.float32))
        if seeded:
            arrays.append(np.asarray(seeded, np.int32))
            arrays.append(np.asarray([seed_key(params[row].seed) for row in seeded], np.int32))
            arrays.append(np.asarray([sampled_params[row][1] for row in seeded], np.int32))
        return arrays, (True, any_top_k, any_top_p, bool(seeded))

    @staticmethod
    def _sampling_tensors(views: list[torch.Tensor], layout: tuple[bool, bool, bool, bool]) -> SamplingTensors:
        any_random, any_top_k, any_top_p, any_seeded = layout
        if not any_random:
            return SamplingTensors()
        views = list(views)
        temperatures = views.pop(0)
        top_k = views.pop(0) if any_top_k else None
        top_p = views.pop(0) if any_top_p else None
        seeded_rows = seed_keys = output_indices = None
        if any_seeded:
            seeded_rows, seed_keys, output_indices = views[0].long(), views[1], views[2]
        return SamplingTensors(temperatures, top_k, top_p, seeded_rows, seed_keys, output_indices)

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput) -> "PendingStep":
        """Queue one step on the device and return at once; the PendingStep gives its samples.

        A PENDING_TOKEN input is the token its sequence sampled in the step launched just before, taken
        from the device: the next step can be queued before this one's samples reach the host.
        """
        for seq_id in scheduler_output.finished_seq_ids:
            self._block_table_rows.pop(seq_id, None)
        if not scheduler_output.sequences:
            return PendingStep(None, [], 0, None, self.device.type == "cuda")
        ids, positions, metadata, logit_rows, sampling, sampled_ids, graph_size, mixed_size = self._prepare(
            scheduler_output)
        on_cuda = self.device.type == "cuda"
        if graph_size is not None:
            logits = self.graphs.replay(graph_size, ids, positions, metadata.slot_mapping, metadata.seq_lens,
                                        metadata.block_tables)
            logits = logits[logit_rows] if len(sampled_ids) != graph_size else logits
        else:
            hidden = self.hidden_states(ids, positions, metadata, mixed_size)
            graph_size = mixed_size
            if not sampled_ids:
                return PendingStep(None, [], graph_size or 0, None, on_cuda)
            logits = self.model.compute_logits(hidden[logit_rows])
        if not sampled_ids or self.rank != 0:
            return PendingStep(None, [], graph_size or 0, None, on_cuda)
        tokens = self.sampler(logits, sampling)
        self._last_tokens = tokens
        self._last_rows = {seq_id: row for row, seq_id in enumerate(sampled_ids)}
        host = None
        if self.device.type == "cuda":
            # Copy behind this step's kernels, before any later step's: the event marks exactly its end.
            self._token_turn ^= 1
            host = self._token_buffers[self._token_turn][:len(sampled_ids)]
            host.copy_(tokens, non_blocking=True)
        return PendingStep(tokens, sampled_ids, graph_size or 0, host, on_cuda)

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                      mixed_size: int | None) -> torch.Tensor:
        """The model's forward (no LM head) over inputs from _prepare: in its mixed-step CUDA graph when _prepare
        padded them for one (mixed_size), else eagerly."""
        if mixed_size is not None:
            return self.mixed_graphs.replay(mixed_size, ids, positions, metadata)
        return self.model(ids, positions, metadata)

    def execute(self, scheduler_output: SchedulerOutput) -> tuple[dict[int, int], int]:
        """Run one step; (sampled token per seq id (rank 0 only), CUDA-graph batch size or 0)."""
        return self.launch(scheduler_output).result()

    def timed_execute(self, scheduler_output: SchedulerOutput) -> tuple[dict[int, int], int, float]:
        """execute() plus its wall time, which includes waiting for the device (execute waits for every step)."""
        start = time.perf_counter()
        sampled, graph_size = self.execute(scheduler_output)
        return sampled, graph_size, time.perf_counter() - start
