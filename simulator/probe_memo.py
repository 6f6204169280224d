"""The planner's simulations shared between configurations that differ only in max_num_seqs.

A probe simulated for one max_num_seqs is, step for step, the probe of another when neither limit ever decided
anything. max_num_seqs reaches a simulated replica in three places: the scheduler admits no request while that
many run; the CUDA graphs the engine would capture (the decode ladder up to the first size covering it, the
mixed-step graphs up to it) set each step's padded size; and the KV cache's size (the engine's profiling pass
samples max_num_seqs rows). So a run whose replicas never had max_num_seqs sequences running, never refused an
admission nor preempted for want of KV blocks, and whose prompts cannot hit the prefix cache (no two requests
begin with the same block), makes the same decisions under any max_num_seqs above its peak and any cache holding
its peak blocks and its largest request: every admission and block check passes alike, a batch of n sequences
pads to the same graph (the two ladders agree up to the smaller limit), and a cache never hit only moves block
ids, which no step time reads. The router sees the same replicas, so it routes alike.

The store is a plain dict in one process, or a multiprocessing manager's dict shared by the planner's workers.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from simulator.planner import Probe
    from simulator.trace_requests import TraceRequests


@dataclass(frozen=True)
class SharedProbe:
    """A probe simulated once, with how close its replicas came to the limits that max_num_seqs sets."""

    probe: Probe
    max_num_seqs: int
    peak_num_running: int
    """The most sequences running at once on any replica."""
    peak_num_used_blocks: int
    """The most KV blocks held at once on any replica."""
    largest_request_blocks: int
    """KV blocks of the trace's largest request (prompt and output): a smaller cache rejects it."""
    independent: bool
    """Neither the KV cache's size nor its contents decided anything: no refusal or preemption for blocks, and no
    prompt able to hit the prefix cache."""

    def holds_for(self, max_num_seqs: int, num_kv_blocks: int) -> bool:
        """Whether a replica of this max_num_seqs and KV block count runs this same simulation."""
        return (self.independent and self.peak_num_running < min(self.max_num_seqs, max_num_seqs)
                and max(self.peak_num_used_blocks, self.largest_request_blocks) <= num_kv_blocks)


class ProbeMemo:
    """Simulations by key (everything but max_num_seqs that makes a probe), each usable for the max_num_seqs and
    KV block counts that SharedProbe.holds_for allows."""

    def __init__(self, store: MutableMapping | None = None) -> None:
        self._store = {} if store is None else store
        self._requests_facts: dict[tuple, tuple[int, bool]] = {}

    def find(self, key: tuple, max_num_seqs: int, num_kv_blocks: int) -> Probe | None:
        """A probe already simulated under key that this replica's limits would repeat, or None."""
        for shared in self._store.get(key, ()):
            if shared.holds_for(max_num_seqs, num_kv_blocks):
                return shared.probe
        return None

    def add(self, key: tuple, probe: Probe, replicas: Sequence, requests: TraceRequests, max_num_seqs: int) -> None:
        """Keep a probe just simulated (replicas: its engines, after the run) for the other max_num_seqs."""
        first = replicas[0]
        manager = first.block_manager
        largest, can_hit = self._facts(requests, manager.block_size, first.executor.token_id,
                                       manager.enable_prefix_caching)
        independent = not can_hit and not any(engine.scheduler.num_kv_refusals or engine.scheduler.num_preemptions
                                               for engine in replicas)
        shared = SharedProbe(
            probe=probe,
            max_num_seqs=max_num_seqs,
            peak_num_running=max(engine.scheduler.peak_num_running for engine in replicas),
            peak_num_used_blocks=max(engine.block_manager.peak_num_used_blocks for engine in replicas),
            largest_request_blocks=largest,
            independent=independent,
        )
        if shared.holds_for(max_num_seqs, manager.num_blocks):
            # Read, extend, write back: a manager's dict hands out copies, not the list it keeps.
            self._store[key] = [*self._store.get(key, ()), shared]

    def prompts_can_meet(self, requests: TraceRequests, block_size: int, token_id: int) -> bool:
        """Whether two of these requests can meet in a prefix cache (begin with the same block, its samples
        token_id)."""
        return self._facts(requests, block_size, token_id, True)[1]

    def _facts(self, requests: TraceRequests, block_size: int, token_id: int, prefix_caching: bool) -> tuple[int, bool]:
        """(KV blocks of the largest request, whether two requests' prompts can meet in the prefix cache)."""
        key = (requests_key(requests), block_size, token_id, prefix_caching)
        facts = self._requests_facts.get(key)
        if facts is None:
            facts = self._requests_facts[key] = _requests_facts(requests, block_size, token_id, prefix_caching)
        return facts


def requests_key(requests: TraceRequests) -> tuple:
    """Which requests these are, within one plan (the whole trace, or one window of it)."""
    return (requests.fingerprint, len(requests), requests.request_ids[0], requests.request_ids[len(requests) - 1])


def _requests_facts(requests: TraceRequests, block_size: int, token_id: int, prefix_caching: bool) -> tuple[int, bool]:
    largest = 0
    roots: set[bytes] = set()
    can_hit = False
    for index in range(len(requests)):
        tokens = requests.prompt_token_ids[index]
        if tokens is None:
            continue  # longer than the model's context: rejected by its length whatever the cache
        length = len(tokens) + max(int(requests.output_lens[index]), 1)
        largest = max(largest, -(-length // block_size))
        if prefix_caching and not can_hit:
            # A block is found only through its sequence's first block (chained hashes), and a short prompt's
            # first block ends with the tokens it samples: every simulated sample is token_id.
            first = np.asarray(tokens[:block_size], dtype=np.int32)
            if len(first) < block_size:
                first = np.concatenate([first, np.full(block_size - len(first), token_id, dtype=np.int32)])
            root = first.tobytes()
            can_hit = root in roots
            roots.add(root)
    return largest, can_hit
