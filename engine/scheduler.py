"""Decides each step's batch under a token budget, in the manner of vLLM v1."""

import bisect
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.scheduler_output import PENDING_TOKEN, ScheduledSequence, SchedulerOutput, StepResult
from engine.sequence import FinishReason, RequestStatus, Sequence
from engine.stats import BatchFeatures


class ScheduleStats(NamedTuple):
    """What happened while deciding a step, for the step log (a named tuple: one is built every step)."""

    num_preempted: int
    prefix_cache_hit_tokens: int


class Scheduler:
    """Running requests first (decodes and unfinished prefill chunks), then waiting ones.

    Chunked prefill lets prefills and decodes share a step. When blocks run out, the most recently
    arrived running request is preempted (recompute): its blocks are freed, it goes back to the front
    of the waiting queue, and no request is admitted in that step.

    A step's computed tokens are counted when it is scheduled and its samples applied by update(), so the
    next step may be scheduled while one is in flight (asynchronous scheduling): a sequence's token still
    in flight is counted as pending and passed as PENDING_TOKEN. A sequence whose pending token is its
    last by length is released before the next step is scheduled, so steps are the same as when each
    step's samples are applied first; a stop token seen late costs one step computed and dropped.
    """

    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """Kept in arrival order, so the last one is the most recently arrived."""
        self._running_keys: list[tuple[float, int]] = []
        self._released_seq_ids: list[int] = []
        self._in_flight: deque[list[tuple[Sequence, int]]] = deque()
        """Per step scheduled and not yet updated: (sequence, tokens computed), in the output's order."""
        self._finishing: list[Sequence] = []
        """Sequences whose last token (by length) a step in flight samples."""
        self._step = 0
        self.last_stats = ScheduleStats(0, 0)
        self.state_before_schedule = (0, 0, 0)
        self.peak_num_running = 0
        """The most sequences ever running at once (statistics: whether max_num_seqs was ever reached)."""
        self.num_kv_refusals = 0
        """Admissions refused for want of KV blocks (statistics: with num_preemptions, whether the cache's size
        ever decided anything)."""
        self.num_preemptions = 0
        """(running, waiting, KV blocks used) as the last schedule began: the state after the step before
        it, which asynchronous scheduling records for that step (its update comes after this schedule)."""

    def add(self, seq: Sequence) -> None:
        seq.status = RequestStatus.WAITING
        self.waiting.append(seq)

    def add_first(self, seqs: list[Sequence]) -> None:
        """Queue seqs, in order, ahead of every waiting sequence."""
        for seq in reversed(seqs):
            seq.status = RequestStatus.WAITING
            self.waiting.appendleft(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _commit_in_flight(self) -> None:
        """Make the blocks the step in flight computes findable now, as its update would before this
        schedule when steps do not overlap (every token it computes is known by now)."""
        if not self.block_manager.enable_prefix_caching:
            return
        commit = self.block_manager.commit_computed
        block_size = self.block_manager.block_size
        for seq, _ in self._in_flight[-1]:
            if seq.status is RequestStatus.RUNNING and seq.num_computed_tokens // block_size > seq.num_committed_blocks:
                commit(seq)

    def _release_finishing(self) -> None:
        """Free the sequences whose last token is in flight: update() will only record it."""
        for seq in self._finishing:
            if seq.status is RequestStatus.RUNNING:
                self._remove_running(seq)
                self.block_manager.free(seq)
                seq.status = RequestStatus.FINISHED
                self._released_seq_ids.append(seq.seq_id)
        self._finishing = []

    def _insert_running(self, seq: Sequence) -> None:
        key = (seq.arrival_time, seq.seq_id)
        index = bisect.bisect(self._running_keys, key)
        self._running_keys.insert(index, key)
        self.running.insert(index, seq)
        seq.status = RequestStatus.RUNNING
        if len(self.running) > self.peak_num_running:
            self.peak_num_running = len(self.running)

    def _remove_running(self, seq: Sequence) -> None:
        index = bisect.bisect_left(self._running_keys, (seq.arrival_time, seq.seq_id))
        assert self.running[index] is seq
        del self._running_keys[index]
        del self.running[index]

    def _preempt_last(self) -> Sequence:
        victim = self.running.pop()
        self._running_keys.pop()
        self.block_manager.free(victim)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        victim.status = RequestStatus.WAITING
        self.waiting.appendleft(victim)
        self._released_seq_ids.append(victim.seq_id)
        return victim

    def _begin_schedule(self) -> None:
        if self._in_flight:
            self._commit_in_flight()
        if self._finishing:
            self._release_finishing()
        self.state_before_schedule = (len(self.running), len(self.waiting), self.block_manager.num_used_blocks)

    def schedule(self, now: float = 0.0) -> SchedulerOutput:
        """Pick the sequences and token counts of the next step (starting at now) and reserve their KV."""
        self._begin_schedule()
        scheduled: list[tuple[Sequence, int]] = []
        budget, num_preempted = self._schedule_running(scheduled, 0, self.config.max_num_batched_tokens)
        num_hit_tokens = self._admit_waiting(scheduled, budget, now) if num_preempted == 0 else 0
        return self._make_output(scheduled, num_preempted, num_hit_tokens)

    def schedule_beside_decodes(self, now: float, num_decodes: int) -> tuple[list[Sequence], SchedulerOutput]:
        """schedule() for a step in which the first num_decodes running sequences decode (prompt computed, one
        token known and not computed) and no sequence is preempted (the caller checks the token budget and the
        free KV blocks): every running sequence is scheduled, its blocks taken, and waiting ones admitted as
        schedule() would, but the output lists only those after the decodes, its features counting the decodes
        too. Returns the decoding sequences, whose samples the caller applies (as decode fast-forward does, for
        executors that answer every decode alike) before update() applies the output's."""
        self._begin_schedule()
        block_manager = self.block_manager
        block_size = block_manager.block_size
        decoders = self.running[:num_decodes]
        needing = []
        decode_context_tokens = 0
        for seq in decoders:
            computed = seq.num_computed_tokens
            decode_context_tokens += computed + 1
            if computed == len(seq.block_table) * block_size:
                needing.append(seq)
            seq.num_computed_tokens = computed + 1
        if needing:  # in running order, as append_slots takes them one by one
            for seq, block_id in zip(needing, block_manager.take(len(needing))):
                seq.block_table.append(block_id)
        scheduled: list[tuple[Sequence, int]] = []
        budget, num_preempted = self._schedule_running(scheduled, num_decodes,
                                                       self.config.max_num_batched_tokens - num_decodes)
        if num_preempted:
            raise RuntimeError(f"step {self._step}: a step beside decodes preempted {num_preempted} sequence(s)")
        num_hit_tokens = self._admit_waiting(scheduled, budget, now)
        return decoders, self._make_output(scheduled, 0, num_hit_tokens, num_decodes, decode_context_tokens)

    def _schedule_running(self, scheduled: list[tuple[Sequence, int]], index: int, budget: int) -> tuple[int, int]:
        """Schedule the running sequences from index on into budget, preempting the latest for blocks; returns
        the budget left and the number preempted."""
        block_manager = self.block_manager
        block_size = block_manager.block_size
        chunked = self.config.enable_chunked_prefill
        running = self.running
        num_preempted = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            remaining = len(seq.token_ids) + seq.num_pending_tokens - seq.num_computed_tokens
            num_new = remaining if remaining < budget else budget
            if not chunked and num_new < remaining:
                index += 1
                continue
            # Blocks still missing for this step's tokens (usually none, or one at a block boundary).
            missing = -(-(seq.num_computed_tokens + num_new) // block_size) - len(seq.block_table)
            while missing > 0 and missing > block_manager.num_free_blocks:
                victim = self._preempt_last()
                num_preempted += 1
                if victim is seq:
                    break
            else:
                if missing > 0:
                    block_manager.append_slots(seq, num_new)
                scheduled.append((seq, num_new))
                budget -= num_new
                index += 1
        return budget, num_preempted

    def _admit_waiting(self, scheduled: list[tuple[Sequence, int]], budget: int, now: float) -> int:
        """Admit waiting sequences into the budget left, appending them to scheduled; returns the prefix-cache hit
        tokens."""
        config = self.config
        block_manager = self.block_manager
        num_hit_tokens = 0
        while self.waiting and budget > 0 and len(self.running) < config.max_num_seqs:
            seq = self.waiting[0]
            # Prompt logprobs need every prompt position computed (vLLM skips the cache for them too).
            cached = block_manager.find_cached_prefix(seq) if seq.sampling_params.prompt_logprobs is None else []
            num_cached = len(cached) * block_manager.block_size
            num_new = seq.num_tokens - num_cached
            if not config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if not block_manager.can_allocate(seq, cached, num_new):
                self.num_kv_refusals += 1
                break
            self.waiting.popleft()
            block_manager.allocate(seq, cached, num_new)
            block_manager.record_lookup(seq.num_tokens, num_cached)
            seq.num_computed_tokens = num_cached
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = num_cached
                seq.first_scheduled_time = now
            num_hit_tokens += num_cached
            self._insert_running(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        return num_hit_tokens

    def _make_output(self, scheduled: list[tuple[Sequence, int]], num_preempted: int, num_hit_tokens: int,
                     num_decode_seqs: int = 0, decode_context_tokens: int = 0) -> SchedulerOutput:
        """The step's output for the scheduled (sequence, new tokens), each then counted as computed; its
        features start from the decodes schedule_beside_decodes leaves out of it."""
        self.num_preemptions += num_preempted
        self.last_stats = ScheduleStats(num_preempted, num_hit_tokens)
        sequences = []
        append = sequences.append
        finishing = self._finishing
        has_token_history = False
        # The batch's features are summed here, in summarize_batch's order and arithmetic, saving it a pass.
        num_prefill_seqs = num_prefill_tokens = prefill_context_tokens = 0
        prefill_attention_work = 0.0
        for seq, num_new in scheduled:
            start = seq.num_computed_tokens
            end = start + num_new
            token_ids = seq.token_ids
            pending = seq.num_pending_tokens
            num_prompt_tokens = seq.num_prompt_tokens
            num_outputs = len(token_ids) + pending - num_prompt_tokens
            samples = end - num_prompt_tokens == num_outputs
            new_tokens = token_ids[start:end]
            params = seq.sampling_params
            if samples:
                if pending:
                    new_tokens.append(PENDING_TOKEN)
                seq.num_pending_tokens = pending + 1
                if num_outputs + 1 >= params.max_tokens:
                    finishing.append(seq)
            is_decode = num_new == 1 and start >= num_prompt_tokens
            scheduled_seq = ScheduledSequence(seq.seq_id, new_tokens, start, seq.block_table, is_decode, samples,
                                              num_outputs, params)
            if params.needs_token_history or (params.prompt_logprobs is not None and start < num_prompt_tokens):
                scheduled_seq.token_history = token_ids[:]
                scheduled_seq.num_prompt_tokens = num_prompt_tokens
                has_token_history = True
            append(scheduled_seq)
            seq.num_computed_tokens = end
            num_tokens = len(new_tokens)
            if is_decode:
                num_decode_seqs += 1
                decode_context_tokens += start + num_tokens
            else:
                num_prefill_seqs += 1
                num_prefill_tokens += num_tokens
                prefill_context_tokens += start
                prefill_attention_work += num_tokens * (start + (num_tokens + 1) / 2)
        released, self._released_seq_ids = self._released_seq_ids, []
        features = BatchFeatures(num_prefill_seqs, num_prefill_tokens, num_decode_seqs, num_decode_seqs,
                                 decode_context_tokens, prefill_context_tokens, prefill_attention_work,
                                 num_prefill_tokens + num_decode_seqs)
        output = SchedulerOutput(
            step=self._step, sequences=sequences, finished_seq_ids=released, features=features,
            has_token_history=has_token_history,
        )
        self._step += 1
        self._in_flight.append(scheduled)
        return output

    def advance_steps(self, num_steps: int) -> int:
        """Count num_steps steps applied without schedule() (decode fast-forward); returns the first one's number."""
        first_step = self._step
        self._step += num_steps
        return first_step

    def discard_empty_step(self, output: SchedulerOutput) -> None:
        """Forget an output with nothing to run; the sequences it released go with the next step."""
        if output.sequences or self._in_flight[-1]:
            raise ValueError("only the last, empty output can be discarded")
        self._in_flight.pop()
        self._step -= 1
        self._released_seq_ids = list(output.finished_seq_ids) + self._released_seq_ids

    def has_steps_in_flight(self) -> bool:
        """Whether a step scheduled has not been applied by update() yet."""
        return bool(self._in_flight)

    def unapplied_sequences(self) -> list[Sequence]:
        """The sequences of every step scheduled and not yet applied, and those released while their last
        token is in flight: what a failed step leaves without its samples."""
        seen: dict[int, Sequence] = {}
        for step in self._in_flight:
            for seq, _ in step:
                seen.setdefault(seq.seq_id, seq)
        for seq in self._finishing:
            seen.setdefault(seq.seq_id, seq)
        return list(seen.values())

    def drop_in_flight(self) -> None:
        """Forget the steps in flight without applying their results (an interrupted run aborts the rest)."""
        self._in_flight.clear()
        self._finishing = []

    def update(self, output: SchedulerOutput, result: StepResult, now: float,
               finished_first: Iterable[tuple[Sequence, FinishReason]] = ()) -> list[Sequence]:
        """Apply the oldest step in flight's result: append samples, finish sequences, commit computed blocks.

        finished_first: (sequence, reason) of the decodes applied in bulk beside this output (schedule_beside_decodes),
        finished before the output's own, after every commit, as when they are in it."""
        finish_reason = self.finish_reason
        block_manager = self.block_manager
        finished: list[tuple[Sequence, FinishReason]] = list(finished_first)
        sampled = result.sampled_token_ids
        logprobs, prompt_logprobs = result.logprobs, result.prompt_logprobs
        commit = block_manager.commit_computed if block_manager.enable_prefix_caching else None
        block_size = block_manager.block_size
        running = RequestStatus.RUNNING
        # The step stays listed until it is applied whole: a failure half way leaves its sequences findable.
        for (seq, _), scheduled in zip(self._in_flight[0], output.sequences):
            if seq.finish_time is not None:
                continue  # aborted, or stopped by a token while this step was in flight: its sample is dropped
            if prompt_logprobs is not None and seq.seq_id in prompt_logprobs:
                _store_prompt_logprobs(seq, *prompt_logprobs[seq.seq_id])
            if scheduled.samples:
                try:
                    token = sampled[seq.seq_id]
                except KeyError:
                    raise RuntimeError(
                        f"the executor returned no token for sequence {seq.seq_id} at step {output.step}"
                    ) from None
                token_ids = seq.token_ids
                token_ids.append(token)
                seq.num_pending_tokens -= 1
                seq.token_times.append(now)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                if logprobs is not None and seq.logprobs is not None:
                    seq.logprobs.append(logprobs[seq.seq_id])
                params = seq.sampling_params
                if params.stops_on_tokens or seq.detokenizer is not None:
                    reason = finish_reason(seq, token)
                    if reason is not None:
                        finished.append((seq, reason))
                elif len(token_ids) - seq.num_prompt_tokens >= params.max_tokens:  # finish_reason's length rule
                    finished.append((seq, FinishReason.LENGTH))
            # A sequence released since (finishing or preempted) holds no blocks to commit; its blocks
            # computed before were committed by the update of the step before.
            if (commit is not None and seq.num_computed_tokens // block_size > seq.num_committed_blocks
                    and seq.status is running):
                commit(seq)
        for seq, reason in finished:
            self.finish(seq, reason, now)
        self._in_flight.popleft()
        return [seq for seq, _ in finished]

    def finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """Why seq finishes having just sampled token (the last of its token_ids); None if it goes on. Sets
        its stop_reason, and feeds its detokenizer, which may find a stop string (vLLM v0.11's check_stop, then
        its detokenizer's stop strings)."""
        params = seq.sampling_params
        num_outputs = len(seq.token_ids) - seq.num_prompt_tokens
        if not params.stops_on_tokens and seq.detokenizer is None:  # only its length can end it
            return FinishReason.LENGTH if num_outputs >= params.max_tokens else None
        reason = None
        if num_outputs >= params.max_tokens:
            reason = FinishReason.LENGTH
        elif num_outputs >= params.min_tokens and self.stops_on(params, token):
            reason = FinishReason.STOP
            if token in params.stop_token_ids:
                seq.stop_reason = token
        if seq.detokenizer is not None:
            stop = seq.detokenizer.update(token, reason is FinishReason.STOP)
            if stop is not None:
                seq.stop_reason = stop
                return FinishReason.STOP
        return reason

    def stops_on(self, params, token: int) -> bool:
        """Whether sampling token stops a request of these sampling params once past its min_tokens (a stop
        token, or EOS unless ignored)."""
        return params.stops_on_tokens and (
            token in params.stop_token_ids or (not params.ignore_eos and token in self.config.eos_token_ids))

    def num_samples_to_first_finish(self, token: int) -> int:
        """How many more samples the running sequences take until finish_reason stops the first of them, if
        every sample is token (decode fast-forward; one call for the batch, as it asks before every step)."""
        fewest = None
        for seq in self.running:
            params = seq.sampling_params
            num_outputs = len(seq.token_ids) - seq.num_prompt_tokens
            num_left = params.max_tokens - num_outputs
            if params.stops_on_tokens and self.stops_on(params, token):
                num_left = min(num_left, max(1, params.min_tokens - num_outputs))
                if num_left == 1:
                    return 1
            if fewest is None or num_left < fewest:
                fewest = num_left
        return fewest

    def finish(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        """End seq for reason at now (it has sampled its last token) and free its blocks."""
        if seq.status is RequestStatus.RUNNING:
            self._remove_running(seq)
            self.block_manager.free(seq)
            self._released_seq_ids.append(seq.seq_id)
        elif seq.status is RequestStatus.WAITING:
            # Preempted while the step that sampled its stop token was in flight.
            self.waiting.remove(seq)
        # else: released before this update (its last token by length was in flight).
        seq.status = RequestStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = now

    def abort(self, seq: Sequence, reason: str, now: float) -> None:
        """Stop a waiting or running sequence and free its blocks; reason says why, for its record."""
        if seq.status is RequestStatus.RUNNING:
            self._remove_running(seq)
            self.block_manager.free(seq)
            self._released_seq_ids.append(seq.seq_id)
        elif seq.status is RequestStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = RequestStatus.ABORTED
        seq.finish_reason = FinishReason.ABORT
        seq.abort_reason = reason
        seq.finish_time = now


def _store_prompt_logprobs(seq: Sequence, first_index: int, entries: list) -> None:
    """Keep a step's prompt logprobs (positions scored before, by a computation redone after preemption, stay)."""
    stored = seq.prompt_logprobs
    for index, entry in enumerate(entries, first_index):
        if stored[index] is None:
            stored[index] = entry
