"""The engine loop: requests arrive on a clock, the scheduler decides, an executor runs, stats are kept."""

import heapq
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np

from engine.block_manager import BlockManager
from engine.clock import Clock, VirtualClock
from engine.config import EngineConfig
from engine.decode_fast_forward import fast_forward_decodes
from engine.executor import AsyncExecutor, DecodeRunPredictor, Executor
from engine.outputs import RequestOutput, request_output
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import StepResult
from engine.sequence import FinishReason, RequestStatus, Sequence
from engine.stats import RequestRecord, StepRecord, batch_features
from engine.step_log import StepLog


class Engine:
    """Feeds arrived requests to the scheduler and runs each step on the executor."""

    def __init__(
        self, config: EngineConfig, executor: Executor, clock: Clock | None = None, fast_forward: bool = True,
        tokenizer=None,
    ) -> None:
        """fast_forward: apply runs of pure-decode steps in bulk when the executor predicts them (simulation).
        tokenizer: a transformers tokenizer, for text outputs, stop strings and bad words (None: token ids only)."""
        self.config = config
        self.tokenizer = tokenizer
        self.executor = executor
        self.clock = clock if clock is not None else VirtualClock()
        num_blocks = config.num_kv_blocks if config.num_kv_blocks is not None else executor.num_kv_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, Sequence | RequestRecord] = {}
        """Every request added, in order: its Sequence when served, its final record when rejected."""
        self.sequences: dict[str, Sequence] = {}
        """The served requests (every one but the rejected), in the order added."""
        self.step_records = StepLog()
        self.num_finished = 0
        """Requests finished or aborted so far."""
        self.num_rejected = 0
        """Requests rejected when added (kept in self.requests as their records)."""
        self._pending: list[tuple[float, int, Sequence]] = []
        self._seq_ids = itertools.count()
        self._last_step_busy = False
        self.horizon: float | None = None
        """A time fast-forwarding must not step past (set by run_until, e.g. a router's next arrival)."""
        self._fast_forward = (
            fast_forward and isinstance(self.clock, VirtualClock) and isinstance(executor, DecodeRunPredictor)
            and not config.async_scheduling
        )
        # Asynchronous scheduling launches through execute_async where the executor has one (the GPU's);
        # an executor that answers at once is simply called.
        self._submit = executor.execute_async if isinstance(executor, AsyncExecutor) else executor.execute
        self._in_flight: tuple | None = None
        """Asynchronous scheduling: (output, pending result, time scheduled, schedule stats) of the step running now."""
        self._last_finish_time = 0.0
        self.parents: dict[str, list[Sequence]] = {}
        """Requests with n > 1: their completions' sequences in index order (each also in self.sequences)."""
        self._held_forks: list[tuple[Sequence, list[Sequence]]] = []
        """(first completion, the others): the others wait until the first has computed the prompt."""
        self._prompts: dict[str, str] = {}
        """The prompt text of requests added with one (for their RequestOutput)."""
        self._in_executor = False
        """True while the executor runs a step: a failure there leaves the scheduler's bookkeeping whole."""

    # ---- requests

    def add_request(
        self,
        *,
        prompt_token_ids: list[int] | None = None,
        prompt_len: int | None = None,
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
        request_id: str | None = None,
        prompt: str | None = None,
    ) -> str:
        """Queue a request to arrive at arrival_time (default now); returns its id.

        A request that can never be served (too long for max_model_len, or needing more KV blocks than the
        whole cache) is recorded as rejected with the reason, not raised. Sampling params the model cannot
        honour (token ids outside the vocabulary, stop strings without a tokenizer) raise ValueError.

        With n > 1 the completions are n sequences with vLLM's request ids "0_ID" .. "{n-1}_ID" (a seeded
        request's completion i has seed + i); the first is scheduled at once and the others once it has
        computed the prompt, so they find the prompt's full blocks in the prefix cache: one prefill.
        """
        seq_id = next(self._seq_ids)
        request_id = str(seq_id) if request_id is None else str(request_id)
        if request_id in self.requests or request_id in self.parents:
            raise ValueError(f"request id {request_id!r} was already added")
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        if arrival_time is None:
            arrival_time = self.clock.now()
        if not math.isfinite(arrival_time):
            raise ValueError(f"request {request_id!r}: arrival_time must be a finite number of seconds, got {arrival_time!r}")
        if prompt_token_ids is None:
            if prompt_len is None:
                raise ValueError(f"request {request_id!r}: give prompt_token_ids or prompt_len")
            if isinstance(prompt_len, bool) or not isinstance(prompt_len, (int, np.integer)) or prompt_len < 0:
                raise ValueError(f"request {request_id!r}: prompt_len must be a non-negative integer, got {prompt_len!r}")
            # A range stands in for the tokens, made only once the request is accepted (truncating it is free).
            prompt_token_ids_or_range = range(int(prompt_len))
        else:
            if prompt_len is not None and prompt_len != len(prompt_token_ids):
                raise ValueError(
                    f"request {request_id!r}: prompt_len {prompt_len} disagrees with {len(prompt_token_ids)} prompt tokens"
                )
            prompt_token_ids_or_range = prompt_token_ids
        if sampling_params.truncate_prompt_tokens is not None:
            prompt_token_ids_or_range = self.truncate_prompt(prompt_token_ids_or_range, sampling_params)
        num_prompt_tokens = len(prompt_token_ids_or_range)
        sampling_params = self.resolve_sampling_params(sampling_params, num_prompt_tokens, request_id)

        # Checked before any token is made: a length from a trace may be far beyond what memory holds.
        reason = self._rejection_reason(num_prompt_tokens, sampling_params.max_tokens)
        if reason:
            self.requests[request_id] = RequestRecord(
                request_id=request_id,
                arrival_time=float(arrival_time),
                prompt_len=num_prompt_tokens,
                max_tokens=sampling_params.max_tokens,
                status=RequestStatus.REJECTED,
                reason=reason,
            )
            self.num_rejected += 1
            return request_id
        if prompt_token_ids is None:
            rng = np.random.default_rng(seq_id)
            prompt_token_ids = rng.integers(0, self.config.vocab_size, num_prompt_tokens).tolist()
        else:
            prompt_token_ids = prompt_token_ids_or_range
        if prompt is not None:
            self._prompts[request_id] = prompt
        if sampling_params.n == 1:
            self._add_sequence(seq_id, request_id, prompt_token_ids, sampling_params, float(arrival_time))
            return request_id
        children = []
        for index in range(sampling_params.n):
            child_params = replace(sampling_params, n=1,
                                   seed=None if sampling_params.seed is None else sampling_params.seed + index,
                                   # Only the first computes the prompt: the others read its blocks.
                                   prompt_logprobs=sampling_params.prompt_logprobs if index == 0 else None)
            children.append(self._add_sequence(seq_id if index == 0 else next(self._seq_ids), f"{index}_{request_id}",
                                               prompt_token_ids, child_params, float(arrival_time), queue=index == 0))
        self.parents[request_id] = children
        self._held_forks.append((children[0], children[1:]))
        return request_id

    def _add_sequence(self, seq_id: int, request_id: str, prompt_token_ids, params: SamplingParams,
                      arrival_time: float, queue: bool = True) -> Sequence:
        seq = Sequence(seq_id, request_id, prompt_token_ids, params, arrival_time)
        if self.tokenizer is not None and params.detokenize:
            from engine.detokenizer import IncrementalDetokenizer  # the tokenizers library, only with a tokenizer

            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
        self.requests[request_id] = seq
        self.sequences[request_id] = seq
        if queue:
            heapq.heappush(self._pending, (seq.arrival_time, seq_id, seq))
        return seq

    def truncate_prompt(self, prompt_token_ids, params: SamplingParams):
        """The prompt's last truncate_prompt_tokens tokens (-1: the last max_model_len), as vLLM truncates."""
        keep = self.config.max_model_len if params.truncate_prompt_tokens == -1 else params.truncate_prompt_tokens
        return prompt_token_ids[-keep:] if len(prompt_token_ids) > keep else prompt_token_ids

    def resolve_sampling_params(self, params: SamplingParams, prompt_len: int, request_id: str) -> SamplingParams:
        """params checked against this model and engine, with max_tokens None resolved to what max_model_len
        leaves and bad words tokenized; ValueError naming the request and the field otherwise."""
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: stop strings {list(params.stop)} need a tokenizer and this "
                             "engine has none (token-id prompts on a model without tokenizer files); use "
                             "stop_token_ids")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError(f"request {request_id!r}: bad_words need a tokenizer and this engine has none; "
                                 "give bad_words_token_ids instead")
            params = params.with_tokenizer(self.tokenizer)
        try:
            params.check_vocab(self.config.vocab_size)
        except ValueError as error:
            raise ValueError(f"request {request_id!r}: {error}") from None
        if params.max_tokens is None:
            params = replace(params, max_tokens=max(1, self.config.max_model_len - prompt_len))
        return params

    def _rejection_reason(self, prompt_len: int, max_tokens: int) -> str:
        config = self.config
        if prompt_len == 0:
            return "empty prompt"
        if prompt_len + max_tokens > config.max_model_len:
            return (
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
                f"exceeds max_model_len ({config.max_model_len})"
            )
        blocks = self.block_manager.blocks_needed(prompt_len + max_tokens)
        if blocks > self.block_manager.num_blocks:
            return (
                f"needs {blocks} KV blocks of {config.block_size} tokens but the whole cache holds "
                f"{self.block_manager.num_blocks}"
            )
        return ""

    def abort(self, request_ids: str | Iterable[str], reason: str = "aborted") -> None:
        """Stop requests that have not finished (one id or several, as vLLM's abort_request; a request with n > 1
        by its id stops all its completions): each is recorded as aborted with the reason and its KV blocks are
        freed. Ids unknown, rejected or finished are ignored, as vLLM ignores them: a client may abort a request
        that has just finished. Call it from the thread that steps the engine."""
        for request_id in (request_ids,) if isinstance(request_ids, str) else request_ids:
            if request_id in self.parents:
                self.abort([child.request_id for child in self.parents[request_id]], reason)
                continue
            seq = self.requests.get(request_id)
            if not isinstance(seq, Sequence) or seq.finish_time is not None:
                continue  # rejected, finished (one released while its last token is in flight is not, until update())
            if seq.status is RequestStatus.WAITING and seq not in self.scheduler.waiting:
                self._pending = [entry for entry in self._pending if entry[2] is not seq]
                heapq.heapify(self._pending)
                self._abort_pending(seq, reason)
            else:
                self.scheduler.abort(seq, reason, self.clock.now())
                self.num_finished += 1
        if self._held_forks:
            self._release_forks()
        if self._in_flight is not None and all(
                seq.finish_time is not None for seq in self.scheduler.unapplied_sequences()):
            # Nothing the step in flight computes is wanted any more: it is dropped, not waited for.
            self._in_flight = None
            self.scheduler.drop_in_flight()
        if not self.has_unfinished():
            self._reset_if_inconsistent()

    def _release_forks(self) -> None:
        """Queue the held completions of every request whose first completion has computed the prompt (or ended)."""
        still_held = []
        for first, others in self._held_forks:
            if first.first_token_time is None and first.finish_time is None:
                still_held.append((first, others))
                continue
            # Ahead of later arrivals: they arrived with the first, and the prompt's blocks are cached now.
            self.scheduler.add_first([seq for seq in others if seq.finish_time is None])
        self._held_forks = still_held

    def _abort_pending(self, seq: Sequence, reason: str) -> None:
        # It never arrived: its finish is no earlier than its arrival, so its latency is not negative.
        seq.status = RequestStatus.ABORTED
        seq.finish_reason = FinishReason.ABORT
        seq.abort_reason = reason
        seq.finish_time = max(self.clock.now(), seq.arrival_time)
        self.num_finished += 1

    def abort_all(self, reason: str) -> None:
        """Abort every request not yet finished (an interrupted run keeps what finished)."""
        # A step in flight is never applied now: the requests whose samples it holds are aborted.
        self._in_flight = None
        self.scheduler.drop_in_flight()
        pending, self._pending = self._pending, []
        for _, _, seq in pending:
            self._abort_pending(seq, reason)
        self.abort([request_id for request_id, seq in self.sequences.items() if seq.finish_time is None], reason)
        self._reset_if_inconsistent()

    def _abandon_unapplied_steps(self, error: BaseException) -> None:
        """A step failed (the executor raised, or an interrupt struck while it ran): the requests of every step
        scheduled and not applied are aborted, as their computed and pending tokens will never be known, and
        those steps are dropped; the other requests go on as if nothing happened."""
        reason = _failure_reason(error)
        victims = self.scheduler.unapplied_sequences()
        self._in_flight = None
        self.scheduler.drop_in_flight()
        now = self.clock.now()
        for seq in victims:
            if seq.finish_time is None:
                self.scheduler.abort(seq, reason, now)
                self.num_finished += 1
        if self._held_forks:
            self._release_forks()
        if not self.has_unfinished():
            self._reset_if_inconsistent()

    def _abort_everything(self, error: BaseException) -> None:
        """A step failed outside the executor (an interrupt in the middle of scheduling or of the block manager's
        bookkeeping): none of that state can be trusted, so every request not finished is aborted without it and
        the scheduler and block manager are rebuilt empty."""
        reason = _failure_reason(error)
        now = self.clock.now()
        self._pending = []
        self._held_forks = []
        for seq in self.sequences.values():
            if seq.finish_time is None:
                seq.drop_unrecorded_tokens()  # the interrupt may have struck between a token and its time
                seq.status = RequestStatus.ABORTED
                seq.finish_reason = FinishReason.ABORT
                seq.abort_reason = reason
                seq.finish_time = max(now, seq.arrival_time)
                seq.block_table = []
                self.num_finished += 1
        self._rebuild_scheduler()

    def _reset_if_inconsistent(self) -> None:
        """With nothing left to serve, no KV block may be held and no step wait to be applied. An interrupt that
        struck in the middle of the scheduler's or the block manager's bookkeeping can leave such leftovers;
        then both are rebuilt empty (the prefix cache with them, so nothing is ever read from a half-made entry)."""
        if not (self.block_manager.holds_nothing() and not self.scheduler.has_steps_in_flight()):
            self._rebuild_scheduler()

    def _rebuild_scheduler(self) -> None:
        """An empty scheduler and block manager in place of the old ones, keeping the step count and cache statistics."""
        old_manager, old_scheduler = self.block_manager, self.scheduler
        manager = BlockManager(old_manager.num_blocks, old_manager.block_size, old_manager.enable_prefix_caching)
        manager.num_query_tokens = old_manager.num_query_tokens
        manager.num_hit_tokens = old_manager.num_hit_tokens
        manager.num_evictions = old_manager.num_evictions
        manager.peak_num_used_blocks = old_manager.peak_num_used_blocks
        scheduler = Scheduler(self.config, manager)
        scheduler.peak_num_running = old_scheduler.peak_num_running
        scheduler.num_kv_refusals = old_scheduler.num_kv_refusals
        scheduler.num_preemptions = old_scheduler.num_preemptions
        scheduler.advance_steps(old_scheduler.advance_steps(0))
        self.block_manager, self.scheduler = manager, scheduler
        self._in_flight = None

    # ---- the loop

    def has_unfinished(self) -> bool:
        return bool(self._pending) or self.scheduler.has_unfinished() or self._in_flight is not None

    @property
    def next_arrival_time(self) -> float | None:
        """When the next request added but not arrived yet arrives; None when there is none."""
        return self._pending[0][0] if self._pending else None

    @property
    def num_pending(self) -> int:
        """Requests added whose arrival time has not come yet."""
        return len(self._pending)

    def _admit_arrivals(self, now: float) -> None:
        pending = self._pending
        while pending and pending[0][0] <= now:
            self.scheduler.add(heapq.heappop(pending)[2])

    def step(self) -> bool:
        """Run one step, or wait for the next arrival when idle; False when there is nothing left.

        If the executor raises (an error, or Ctrl-C while it runs), the requests of the steps not applied are
        aborted and the others go on; an interrupt anywhere else in the step aborts every request and rebuilds the
        scheduler. Either way the error goes on, and the engine is consistent for whatever comes next."""
        try:
            return self._step_async() if self.config.async_scheduling else self._step_sync()
        except BaseException as error:
            if self._in_executor:
                self._in_executor = False
                self._abandon_unapplied_steps(error)
            else:
                self._abort_everything(error)
            raise

    def _step_sync(self) -> bool:
        now = self.clock.now()
        self._admit_arrivals(now)
        if not self.scheduler.has_unfinished():
            self._last_step_busy = False
            if not self._pending:
                return False
            self.clock.sleep_until(self._pending[0][0])
            return True
        if self._last_step_busy and self.step_records:
            self.step_records.end_last_step_at(now)
        # Fast-forwarding appends tokens in bulk: never with a tokenizer, which reads them one by one.
        if self._fast_forward and self.tokenizer is None and (
                fast_forward_decodes(self, now) or self._step_beside_decodes(now)):
            self._last_step_busy = True
            return True

        output = self.scheduler.schedule(now)
        if output.is_empty:
            raise RuntimeError(
                f"step {output.step}: nothing schedulable with {len(self.scheduler.waiting)} waiting and "
                f"{len(self.scheduler.running)} running requests"
            )
        self._in_executor = True
        result = self.executor.execute(output)
        self._in_executor = False
        end = self.clock.advance(result.duration)
        self.num_finished += len(self.scheduler.update(output, result, end))
        if self._held_forks:
            self._release_forks()
        self._record_step(output, now, end - now, result.cuda_graph_batch_size)
        self._last_step_busy = True
        return True

    def _step_beside_decodes(self, now: float) -> bool:
        """Run one step in which every running sequence decodes but perhaps the last (a prompt being chunked),
        with any admissions, the decodes applied here in bulk as fast-forward applies them (no
        ScheduledSequence, sample or update of their own): the step schedule() and update() would make, at a
        fraction of the cost per running sequence. False, with nothing done, where that step could preempt."""
        num_decodes = self._num_bulk_decodes()
        if num_decodes is None:
            return False
        scheduler = self.scheduler
        manager = self.block_manager
        block_size = manager.block_size
        decoders, output = scheduler.schedule_beside_decodes(now, num_decodes)
        # Not flagged as in the executor: a failure anywhere here aborts every request (the decodes are half done).
        result = self.executor.execute(output)
        end = self.clock.advance(result.duration)
        token = self.executor.token_id
        commit = manager.commit_computed if manager.enable_prefix_caching else None
        finished = []
        # As update() applies them, the decodes first (each finished after every commit of the step); without a
        # tokenizer no detokenizer reads the tokens.
        for seq in decoders:
            token_ids = seq.token_ids
            token_ids.append(token)
            seq.token_times.append(end)
            params = seq.sampling_params
            if params.stops_on_tokens:
                reason = scheduler.finish_reason(seq, token)
                if reason is not None:
                    finished.append((seq, reason))
            elif len(token_ids) - seq.num_prompt_tokens >= params.max_tokens:
                finished.append((seq, FinishReason.LENGTH))
            if commit is not None and seq.num_computed_tokens // block_size > seq.num_committed_blocks:
                commit(seq)
        self.num_finished += len(scheduler.update(output, result, end, finished_first=finished))
        if self._held_forks:
            self._release_forks()
        self._record_step(output, now, end - now, result.cuda_graph_batch_size)
        return True

    def _num_bulk_decodes(self) -> int | None:
        """How many leading running sequences a step beside decodes would apply in bulk; None where that step
        could preempt (blocks or budget short) or has more than one prompt running. A step of decodes alone, which
        fast-forward turned down (a sequence finishes in it, or it admits), goes this way too."""
        scheduler = self.scheduler
        running = scheduler.running
        config = self.config
        manager = self.block_manager
        budget = config.max_num_batched_tokens
        if not running or len(running) > budget:
            return None
        block_size = manager.block_size
        num_decodes = num_new_blocks = 0
        for seq in running:
            computed = seq.num_computed_tokens
            if computed != len(seq.token_ids) - 1 or computed < seq.num_prompt_tokens:
                break
            num_decodes += 1
            if computed == len(seq.block_table) * block_size:
                num_new_blocks += 1
        if num_decodes < len(running):
            if num_decodes != len(running) - 1 or num_decodes >= budget:
                return None
            # The last is in its prompt: its chunk is what the decodes leave of the budget.
            last = running[-1]
            computed = last.num_computed_tokens
            remaining = len(last.token_ids) - computed
            num_new = min(remaining, budget - num_decodes)
            if num_new < remaining and not config.enable_chunked_prefill:
                return None
            num_new_blocks += max(0, -(-(computed + num_new) // block_size) - len(last.block_table))
        return num_decodes if num_new_blocks <= manager.num_free_blocks else None

    def _step_async(self) -> bool:
        """Schedule and launch the next step, then apply the one in flight: the host's work for a step
        overlaps the executor's previous one. A step lasts from the end of the one before (or its
        scheduling, after an idle time) to when its result is applied."""
        now = self.clock.now()
        self._admit_arrivals(now)
        scheduler = self.scheduler
        in_flight = self._in_flight
        schedulable = scheduler.has_unfinished()
        if in_flight is None and not schedulable:
            if not self._pending:
                return False
            self.clock.sleep_until(self._pending[0][0])
            return True
        output = scheduler.schedule(now) if schedulable else None
        # The previous step's record shows the state it left, as this schedule found it.
        state = scheduler.state_before_schedule if output is not None else None
        if output is not None and output.is_empty:
            scheduler.discard_empty_step(output)
            output = None
        if output is None and in_flight is None:
            raise RuntimeError(
                f"nothing schedulable with {len(scheduler.waiting)} waiting and {len(scheduler.running)} running requests"
            )
        self._in_flight = None
        self._in_executor = True
        if output is not None:
            self._in_flight = (output, self._submit(output), now, scheduler.last_stats)
        if in_flight is not None:
            previous, pending, scheduled_at, stats = in_flight
            result = pending if isinstance(pending, StepResult) else pending.result()
        self._in_executor = False
        if in_flight is not None:
            start = max(scheduled_at, self._last_finish_time)
            end = self.clock.advance(result.duration)
            self.num_finished += len(scheduler.update(previous, result, end))
            if self._held_forks:
                self._release_forks()
            self._record_step(previous, start, end - start, result.cuda_graph_batch_size, stats, state)
            self._last_finish_time = end
        return True

    def _record_step(self, output, start: float, duration: float, cuda_graph_batch_size: int, stats=None,
                     state=None) -> None:
        features = batch_features(output)
        stats = stats or self.scheduler.last_stats
        block_manager = self.block_manager
        scheduler = self.scheduler
        num_running, num_waiting, num_used_blocks = state or (
            len(scheduler.running), len(scheduler.waiting), block_manager.num_used_blocks
        )
        self.step_records.append(StepRecord(
            step=output.step,
            start_time=start,
            duration=duration,
            num_prefill_seqs=features.num_prefill_seqs,
            num_prefill_tokens=features.num_prefill_tokens,
            num_decode_seqs=features.num_decode_seqs,
            num_decode_tokens=features.num_decode_tokens,
            decode_context_tokens=features.decode_context_tokens,
            prefill_context_tokens=features.prefill_context_tokens,
            prefill_attention_work=features.prefill_attention_work,
            num_running=num_running,
            num_waiting=num_waiting,
            kv_blocks_used=num_used_blocks,
            kv_blocks_total=block_manager.num_blocks,
            num_preempted=stats.num_preempted,
            prefix_cache_hit_tokens=stats.prefix_cache_hit_tokens,
            cuda_graph_batch_size=cuda_graph_batch_size,
            num_batched_tokens=features.num_batched_tokens,
        ))

    def run(self, on_step: Callable[["Engine"], None] | None = None) -> None:
        """Step until every added request has finished or been rejected."""
        while self.step():
            if on_step is not None:
                on_step(self)

    def run_until(self, when: float) -> None:
        """Run every step that starts before `when` (a step may end after it), then stop.

        On a virtual clock an idle engine is moved to `when`, so requests added next arrive on time.
        """
        self.horizon = when
        try:
            while self.clock.now() < when:
                if (not self.scheduler.has_unfinished() and self._in_flight is None
                        and (not self._pending or self._pending[0][0] >= when)):
                    self._last_step_busy = False
                    self.clock.sleep_until(when)
                    break
                self.step()
        finally:
            self.horizon = None

    # ---- results

    def pop_ended_records(self) -> list[RequestRecord]:
        """The records of the requests that have ended (finished, aborted or rejected), in the order added, which
        the engine then forgets: a long trace streams its records out this way, so memory holds only the requests
        not ended. Their ids are forgotten too (a later request may reuse one)."""
        ended = [request_id for request_id, request in self.requests.items()
                 if not isinstance(request, Sequence) or request.finish_time is not None]
        records = []
        for request_id in ended:
            request = self.requests.pop(request_id)
            if isinstance(request, Sequence):
                del self.sequences[request_id]
                records.append(_record_of(request))
            else:
                records.append(request)
            self._prompts.pop(request_id, None)
        for parent, children in list(self.parents.items()):
            if all(child.finish_time is not None for child in children):
                del self.parents[parent]
                self._prompts.pop(parent, None)
        return records

    def output_token_ids(self, request_id: str) -> list[int]:
        return self.sequences[request_id].output_token_ids

    def request_output(self, request_id: str) -> RequestOutput:
        """The request's RequestOutput as it stands (vLLM's shape: completions so far, finished or not)."""
        sequences = self.parents.get(request_id)
        if sequences is None:
            request = self.requests[request_id]
            if not isinstance(request, Sequence):
                raise ValueError(f"request {request_id!r} was {request.status}: {request.reason}")
            sequences = [request]
        return request_output(request_id, self._prompts.get(request_id), sequences, self.tokenizer)

    @property
    def request_records(self) -> dict[str, RequestRecord]:
        """One record per added request, served or rejected, in the order they were added."""
        return {
            request_id: _record_of(request) if isinstance(request, Sequence) else request
            for request_id, request in self.requests.items()
        }


def _failure_reason(error: BaseException) -> str:
    """Why the requests of a failed step were aborted: "interrupted" (Ctrl-C), "interrupted by SIGTERM" (an
    interrupt naming another signal), or the error."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted" if str(error) in ("", "SIGINT") else f"interrupted by {error}"
    return f"error: {type(error).__name__}: {error}"


def _record_of(seq: Sequence) -> RequestRecord:
    """A served request's record, as it stands now."""
    if seq.status is RequestStatus.ABORTED:
        reason = f"{RequestStatus.ABORTED}: {seq.abort_reason}"
    else:
        reason = seq.finish_reason or ""
    return RequestRecord(
        request_id=seq.request_id,
        arrival_time=seq.arrival_time,
        prompt_len=seq.num_prompt_tokens,
        max_tokens=seq.sampling_params.max_tokens,
        first_scheduled_time=seq.first_scheduled_time,
        first_token_time=seq.first_token_time,
        finish_time=seq.finish_time,
        output_len=seq.num_output_tokens,
        cached_tokens=seq.num_cached_tokens or 0,
        num_preemptions=seq.num_preemptions,
        status=seq.status,
        reason=reason,
        token_times=seq.token_times,
    )
