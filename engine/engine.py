"""The engine loop: requests arrive on a clock, the scheduler decides, an executor runs, stats are kept."""

import heapq
import itertools
import math
from collections.abc import Callable, Iterable

import numpy as np

from engine.block_manager import BlockManager
from engine.clock import Clock, VirtualClock
from engine.config import EngineConfig
from engine.decode_fast_forward import fast_forward_decodes
from engine.executor import AsyncExecutor, DecodeRunPredictor, Executor
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import StepResult
from engine.sequence import FinishReason, RequestStatus, Sequence
from engine.stats import RequestRecord, StepRecord, batch_features
from engine.step_log import StepLog


class Engine:
    """Feeds arrived requests to the scheduler and runs each step on the executor."""

    def __init__(
        self, config: EngineConfig, executor: Executor, clock: Clock | None = None, fast_forward: bool = True
    ) -> None:
        """fast_forward: apply runs of pure-decode steps in bulk when the executor predicts them (simulation)."""
        self.config = config
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
    ) -> str:
        """Queue a request to arrive at arrival_time (default now); returns its id.

        A request that can never be served (too long for max_model_len, or needing more KV blocks than the
        whole cache) is recorded as rejected with the reason, not raised.
        """
        seq_id = next(self._seq_ids)
        request_id = str(seq_id) if request_id is None else str(request_id)
        if request_id in self.requests:
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
            num_prompt_tokens = int(prompt_len)
        else:
            num_prompt_tokens = len(prompt_token_ids)
            if prompt_len is not None and prompt_len != num_prompt_tokens:
                raise ValueError(
                    f"request {request_id!r}: prompt_len {prompt_len} disagrees with {num_prompt_tokens} prompt tokens"
                )

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
        seq = Sequence(seq_id, request_id, prompt_token_ids, sampling_params, float(arrival_time))
        self.requests[request_id] = seq
        self.sequences[request_id] = seq
        heapq.heappush(self._pending, (seq.arrival_time, seq_id, seq))
        return request_id

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
        """Stop requests that have not finished (one id or several, as vLLM's abort_request): each is recorded as
        aborted with the reason and its KV blocks are freed. Ids unknown, rejected or finished are ignored, as
        vLLM ignores them: a client may abort a request that has just finished."""
        for request_id in (request_ids,) if isinstance(request_ids, str) else request_ids:
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
        if self._in_flight is not None and all(
                seq.finish_time is not None for seq in self.scheduler.unapplied_sequences()):
            # Nothing the step in flight computes is wanted any more: it is dropped, not waited for.
            self._in_flight = None
            self.scheduler.drop_in_flight()
        if not self.has_unfinished():
            self._reset_if_inconsistent()

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
        """A step failed (the executor raised, or an interrupt struck inside step()): the requests of every step
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
        if not self.has_unfinished():
            self._reset_if_inconsistent()

    def _abort_everything(self, error: BaseException) -> None:
        """A step failed outside the executor (an interrupt in the middle of scheduling or of the block manager's
        bookkeeping): none of that state can be trusted, so every request not finished is aborted without it and
        the scheduler and block manager are rebuilt empty."""
        reason = _failure_reason(error)
        now = self.clock.now()
        self._pending = []
        for seq in self.sequences.values():
            if seq.finish_time is None:
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
        scheduler = Scheduler(self.config, manager)
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
        if self._fast_forward and fast_forward_decodes(self, now):
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
        self._record_step(output, now, end - now, result.cuda_graph_batch_size)
        self._last_step_busy = True
        return True

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
        return records

    def output_token_ids(self, request_id: str) -> list[int]:
        return self.sequences[request_id].output_token_ids

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
