"""A step's model inputs: host arrays named per kind of step, copied to the device in one transfer.

prepare_decode, prepare_prefill (and fixed_layout for a mixed-step CUDA graph) and prepare_sample turn the
scheduled sequences into numpy arrays; StagingBuffer.upload sends all of them at once and hands back device
views under the same names, from which each kind builds its AttentionMetadata and SamplingTensors.
"""

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.logits_processors import ProcessorArrays, prepare_processors
from engine.sampler import SamplingTensors, seed_key

_ALIGN = 16  # int32 elements: 64 bytes


class StagingBuffer:
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

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Copy int32/float32 numpy arrays to the device in one transfer; device views under the same names."""
        # Every array starts on a 64-byte boundary: Triton specializes kernels on pointer alignment, so
        # unaligned views would compile new kernel variants in the middle of a run.
        sizes = [-(-a.size // _ALIGN) * _ALIGN for a in arrays.values()]
        total = sum(sizes)
        if total > self.hosts[0].numel():
            if self.pinned:
                torch.cuda.synchronize(self.device)  # copies from the old buffers may be queued
            self._allocate(1 << math.ceil(math.log2(total)))
        self._turn ^= 1
        host, host_np = self.hosts[self._turn], self.host_nps[self._turn]
        offsets = []
        offset = 0
        for array, size in zip(arrays.values(), sizes):
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
        views = {}
        for (name, array), start in zip(arrays.items(), offsets):
            view = source[start:start + array.size]
            if array.dtype == np.float32:
                view = view.view(torch.float32)
            views[name] = view.view(array.shape)
        return views


def arrays_of(host) -> dict[str, np.ndarray]:
    """The arrays of a host-inputs dataclass by name, leaving out fields it does not use (None)."""
    return {f.name: value for f in fields(host) if isinstance(value := getattr(host, f.name), np.ndarray)}


@dataclass(frozen=True, slots=True)
class DecodeArrays:
    """A step of one new token per row, in the decode kernel's layout; rows past the batch (a decode graph's
    padding) write no KV (slot -1) and attend to nothing (context 0)."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray

    @staticmethod
    def metadata(dev: dict[str, torch.Tensor]) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=dev["slot_mapping"], seq_lens=dev["seq_lens"],
                                 block_tables=dev["block_tables"])


@dataclass(frozen=True, slots=True)
class PrefillArrays:
    """A step with prompt chunks, run eagerly: each row's new tokens back to back (cu_seqlens_q), the
    one-token rows first."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    cu_seqlens_q: np.ndarray
    max_query_len: int
    num_single: int

    def metadata(self, dev: dict[str, torch.Tensor]) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=dev["slot_mapping"], seq_lens=dev["seq_lens"],
                                 block_tables=dev["block_tables"], cu_seqlens_q=dev["cu_seqlens_q"],
                                 max_query_len=self.max_query_len, num_single=self.num_single)


@dataclass(frozen=True, slots=True)
class FixedLayoutArrays:
    """A step with prompt chunks padded for its mixed-step CUDA graph (see MixedStepGraphs.replay)."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    cu_seqlens_q: np.ndarray
    decode_seq_lens: np.ndarray
    tile_map: np.ndarray
    decode_work_map: np.ndarray
    decode_work_starts: np.ndarray
    decode_partition_size: np.ndarray

    @staticmethod
    def metadata(dev: dict[str, torch.Tensor]) -> AttentionMetadata:
        tile_map = dev["tile_map"]
        return AttentionMetadata(slot_mapping=dev["slot_mapping"], seq_lens=dev["seq_lens"],
                                 block_tables=dev["block_tables"], cu_seqlens_q=dev["cu_seqlens_q"],
                                 decode_seq_lens=dev["decode_seq_lens"], tile_map=(tile_map[0], tile_map[1]),
                                 decode_work=(dev["decode_work_map"], dev["decode_work_starts"],
                                              dev["decode_partition_size"]))


@dataclass(frozen=True, slots=True)
class SampleArrays:
    """The rows that sample: where their logits come from and their settings, each only when a row uses it."""

    logit_rows: np.ndarray
    """Rows of the step's hidden states (or decode-graph logits) to sample from."""
    temperatures: np.ndarray | None = None
    top_k: np.ndarray | None = None
    top_p: np.ndarray | None = None
    seeded_rows: np.ndarray | None = None
    seed_keys: np.ndarray | None = None
    output_indices: np.ndarray | None = None
    min_p: np.ndarray | None = None
    logprob_rows: np.ndarray | None = None
    """Rows (of the sampling rows) whose requests want logprobs."""
    logprob_counts: list[int] | None = None
    """How many top tokens each of those rows wants (-1: the whole vocabulary)."""
    processors: ProcessorArrays | None = None

    def upload_arrays(self) -> dict[str, np.ndarray]:
        """Every array to copy to the device, by name."""
        arrays = arrays_of(self)
        return arrays | self.processors.arrays() if self.processors is not None else arrays

    def tensors(self, dev: dict[str, torch.Tensor]) -> SamplingTensors:
        processors = self.processors.tensors(dev) if self.processors is not None else None
        logprob_rows = dev["logprob_rows"].long() if self.logprob_rows is not None else None
        num_logprobs = 0
        if self.logprob_counts:
            num_logprobs = -1 if -1 in self.logprob_counts else max(self.logprob_counts)
        if self.temperatures is None:
            if processors is None and logprob_rows is None:
                return SamplingTensors()
            return SamplingTensors(processors=processors, logprob_rows=logprob_rows, num_logprobs=num_logprobs)
        seeded_rows = dev["seeded_rows"].long() if self.seeded_rows is not None else None
        return SamplingTensors(dev["temperatures"], dev.get("top_k"), dev.get("top_p"), seeded_rows,
                               dev.get("seed_keys"), dev.get("output_indices"), dev.get("min_p"), processors,
                               logprob_rows, num_logprobs)


@dataclass(frozen=True, slots=True)
class PromptLogprobPlan:
    """The prompt positions a step scores for requests asking for prompt logprobs."""

    rows: np.ndarray
    """Rows of the step's hidden states (or decode-graph logits) whose next token is a prompt token."""
    targets: np.ndarray
    """That next prompt token, per row."""
    spans: list[tuple[int, int, int, int]]
    """Per sequence: (seq id, index of its first prompt token scored, how many, top tokens wanted (-1: all))."""


@dataclass(frozen=True, slots=True)
class StepInputs:
    """One step's inputs on the device, and what the host keeps to run and answer it."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logit_rows: torch.Tensor
    sampling: SamplingTensors
    sampled_ids: list[int]
    """The sequences that sample, in the order of logit_rows."""
    decode_graph_size: int = 0
    """The batch size of the decode CUDA graph this step replays; 0 when it replays none."""
    mixed_graph_size: int = 0
    """The token count of the mixed-step CUDA graph this step replays; 0 when it replays none."""
    logprob_counts: list[int] | None = None
    """Per row of sampling.logprob_rows: how many top tokens its request wants (-1: all)."""
    prompt_logprobs: PromptLogprobPlan | None = None
    prompt_logprob_rows: torch.Tensor | None = None
    prompt_logprob_targets: torch.Tensor | None = None


def prepare_decode(seqs, rows: int, block_size: int, table_cache: dict[int, np.ndarray]) -> DecodeArrays:
    """Host arrays of a step of one new token per row, padded to rows. table_cache keeps each sequence's block
    table as an array between steps (its owner drops finished sequences)."""
    # The hot path (pure decode): list comprehensions, then one array per input.
    num_seqs = len(seqs)
    width = max(len(seq.block_table) for seq in seqs)
    block_tables = np.zeros((rows, width), np.int32)
    seq_lens = np.zeros(rows, np.int32)
    ids = np.zeros(rows, np.int32)
    positions = np.zeros(rows, np.int32)
    slots = np.full(rows, -1, np.int32)
    position_list = [seq.num_computed_tokens for seq in seqs]
    ids[:num_seqs] = [seq.token_ids[0] for seq in seqs]
    positions[:num_seqs] = position_list
    slots[:num_seqs] = [seq.block_table[p // block_size] * block_size + p % block_size
                        for seq, p in zip(seqs, position_list)]
    seq_lens[:num_seqs] = positions[:num_seqs] + 1
    table_rows = []
    for seq in seqs:
        table = seq.block_table
        cached = table_cache.get(seq.seq_id)
        # Tables only grow while a sequence runs (a preempted one is released first), so
        # converting again is needed only when a block was added.
        if cached is None or cached.size != len(table):
            cached = table_cache[seq.seq_id] = np.asarray(table, np.int32)
        table_rows.append(cached)
    # One scatter of all rows: row-major order of the mask is the concatenation's order.
    lengths = np.fromiter(map(len, table_rows), np.int32, num_seqs)
    block_tables[:num_seqs][np.arange(width) < lengths[:, None]] = np.concatenate(table_rows)
    return DecodeArrays(ids, positions, slots, seq_lens, block_tables)


def prepare_prefill(seqs, num_single: int, block_size: int) -> PrefillArrays:
    """Host arrays of a step with prompt chunks, given its sequences with the num_single one-token rows first."""
    num_seqs = len(seqs)
    width = max(len(seq.block_table) for seq in seqs)
    block_tables = np.zeros((num_seqs, width), np.int32)
    seq_lens = np.zeros(num_seqs, np.int32)
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
    return PrefillArrays(np.concatenate(id_parts), np.concatenate(position_parts), np.concatenate(slot_parts),
                         seq_lens, block_tables, cu, max_query_len=max(len(seq.token_ids) for seq in seqs),
                         num_single=num_single)


def fixed_layout(arrays: PrefillArrays, num_tokens: int, graphs) -> FixedLayoutArrays:
    """A step's arrays padded for graphs (MixedStepGraphs) at num_tokens: tokens to num_tokens (slot -1),
    sequences to its max_seqs rows (context 0), plus the one-token rows' contexts, the prefill tile map and
    the decode work map (its map, each row's first entry, its partition size)."""
    from engine.kernels.decode_attention import decode_work_map  # Triton only where the graphs are built
    from engine.kernels.prefill_attention import prefill_tile_map

    ids, positions, slots, cu = arrays.input_ids, arrays.positions, arrays.slot_mapping, arrays.cu_seqlens_q
    num_single = arrays.num_single
    total, num_seqs = len(ids), len(arrays.seq_lens)
    pad = num_tokens - total
    if pad:
        ids = np.concatenate([ids, np.zeros(pad, np.int32)])
        positions = np.concatenate([positions, np.zeros(pad, np.int32)])
        slots = np.concatenate([slots, np.full(pad, -1, np.int32)])
    seq_lens = np.zeros(graphs.max_seqs, np.int32)
    seq_lens[:num_seqs] = arrays.seq_lens
    decode_seq_lens = np.zeros(graphs.max_seqs, np.int32)
    decode_seq_lens[:num_single] = arrays.seq_lens[:num_single]
    padded_cu = np.full(graphs.max_seqs + 1, total, np.int32)
    padded_cu[:num_seqs + 1] = cu
    tile_map = prefill_tile_map(np.diff(cu), graphs.block_q, graphs.tile_capacity(num_tokens), first_seq=num_single)
    work_map, starts, partition_size = decode_work_map(decode_seq_lens, graphs.work_capacity(num_tokens))
    return FixedLayoutArrays(ids, positions, slots, seq_lens, arrays.block_tables, padded_cu, decode_seq_lens,
                             tile_map, work_map, starts, np.asarray([partition_size], np.int32))


def prepare_sample(seqs, last_token_rows: np.ndarray, eos_token_ids: tuple[int, ...] = (),
                   pending_token=None) -> tuple[SampleArrays, list[int]]:
    """Host arrays of the sequences that sample (last_token_rows: each sequence's last row of hidden states),
    and their seq ids in the same order. eos_token_ids and pending_token (seq id -> its token still on the
    device) serve the logits processors of requests that have any."""
    if all(seq.samples for seq in seqs):  # every step of pure decodes
        logit_rows = last_token_rows
    else:
        picked = [row for row, seq in enumerate(seqs) if seq.samples]
        seqs = [seqs[row] for row in picked]
        logit_rows = last_token_rows[picked]
    sampled_ids = [seq.seq_id for seq in seqs]
    params = [seq.sampling_params for seq in seqs]
    extras = {}
    if any(p.uses_logits_processors or p.logprobs is not None for p in params):
        extras = _sample_extras(seqs, params, eos_token_ids, pending_token)
    if all(p.greedy for p in params):
        return SampleArrays(logit_rows, **extras), sampled_ids
    temperatures = np.asarray([0.0 if p.greedy else p.temperature for p in params], np.float32)
    if any(p.min_p > 0.0 for p in params):
        extras["min_p"] = np.asarray([p.min_p for p in params], np.float32)
    top_k = top_p = seeded_rows = seed_keys = output_indices = None
    if any(p.top_k > 0 and not p.greedy for p in params):
        top_k = np.asarray([max(p.top_k, 0) for p in params], np.int32)
    if any(p.top_p < 1.0 and not p.greedy for p in params):
        top_p = np.asarray([p.top_p for p in params], np.float32)
    seeded = [row for row, p in enumerate(params) if p.seed is not None and not p.greedy]
    if seeded:
        seeded_rows = np.asarray(seeded, np.int32)
        seed_keys = np.asarray([seed_key(params[row].seed) for row in seeded], np.int32)
        output_indices = np.asarray([seqs[row].num_output_tokens for row in seeded], np.int32)
    return (SampleArrays(logit_rows, temperatures, top_k, top_p, seeded_rows, seed_keys, output_indices, **extras),
            sampled_ids)


def _sample_extras(seqs, params, eos_token_ids, pending_token) -> dict:
    """SampleArrays' fields for logits processors and logprobs (the slow path: only rows that ask)."""
    extras = {"processors": prepare_processors(seqs, eos_token_ids, pending_token)}
    asking = [row for row, p in enumerate(params) if p.logprobs is not None]
    if asking:
        extras["logprob_rows"] = np.asarray(asking, np.int32)
        extras["logprob_counts"] = [params[row].logprobs for row in asking]
    return extras


def prepare_prompt_logprobs(seqs, token_starts: np.ndarray) -> PromptLogprobPlan | None:
    """The prompt positions this step scores (seqs in the step's row order, token_starts: each one's first row
    of hidden states), or None when no sequence asks for prompt logprobs here."""
    rows, targets, spans = [], [], []
    for seq, first_row in zip(seqs, token_starts.tolist()):
        if seq.token_history is None or seq.sampling_params.prompt_logprobs is None:
            continue
        start = seq.num_computed_tokens
        # Position p's logits predict token p + 1: score the prompt tokens after this chunk's positions.
        end = min(start + len(seq.token_ids), seq.num_prompt_tokens - 1)
        if end <= start:
            continue
        rows.append(np.arange(first_row, first_row + end - start, dtype=np.int32))
        targets.append(np.frombuffer(seq.token_history, np.int32)[start + 1:end + 1])
        spans.append((seq.seq_id, start + 1, end - start, seq.sampling_params.prompt_logprobs))
    if not spans:
        return None
    return PromptLogprobPlan(np.concatenate(rows), np.concatenate(targets).astype(np.int32), spans)
