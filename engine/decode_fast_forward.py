"""Skipping through runs of identical pure-decode steps when an executor can predict them.

A cost-model executor knows a decode step's duration without running anything, so long stretches
where the same sequences just decode (no arrival, no preemption, and no admission: nothing waits, or
max_num_seqs sequences already run) can be applied in bulk, up to and
including the step where the first of them finish (by length). Every effect of stepping one by one is
reproduced: block allocations at block boundaries, prefix-cache registrations, token times, finishes,
clock arithmetic and one step record per step.
"""

from array import array
from bisect import bisect_left
from itertools import accumulate, repeat

MIN_STEPS = 2
FIRST_CHUNK = 64
"""Durations first predicted when an arrival may cut the run short (more are asked for if it does not)."""


def fast_forward_decodes(engine, now: float) -> bool:
    """Apply as many pure-decode steps as can be proven identical to stepping; False if none.

    The engine's executor is a DecodeRunPredictor. A run that ends only because sequences finished (no
    arrival due by then, no horizon reached) is followed by the run of those left, as the engine's next
    step would start it: one call covers a batch draining between two arrivals.
    """
    ran = False
    while True:
        outcome = _apply_run(engine, now)
        if outcome is None:
            return ran
        ran = True
        if not outcome:
            return True
        now = engine.clock.now()


def _apply_run(engine, now: float) -> bool | None:
    """Apply one run of identical pure-decode steps: None if there is none; else whether it ended only because
    sequences finished (before any arrival or horizon), so that the next step may start another run."""
    scheduler = engine.scheduler
    running = scheduler.running
    config = engine.config
    # Waiting requests are admitted only once a running one finishes when max_num_seqs run: until then the
    # steps are the pure-decode steps of the running ones (a saturated replica with a queue).
    waiting = len(scheduler.waiting)
    if (waiting and len(running) < config.max_num_seqs) or not running or len(running) > config.max_num_batched_tokens:
        return None
    # The latest arrival, last in running, is the one likeliest still in its prompt (chunked prefill): a run
    # that cannot start is told at once, not after a pass over every decoding sequence.
    last = running[-1]
    if last.num_computed_tokens != len(last.token_ids) - 1 or last.num_computed_tokens < last.num_prompt_tokens:
        return None
    executor = engine.executor
    token = executor.token_id
    # Every step samples one token of each sequence: the run may end with the step where the first ones
    # finish (a token that stops a sequence finishes it in the first step, leaving no run). Asked first: in a
    # saturated replica one finishes nearly every step, and the pass below is then not needed.
    steps_to_first_finish = scheduler.num_samples_to_first_finish(token)
    max_steps = steps_to_first_finish
    if max_steps < MIN_STEPS:
        return None
    context = 0
    for seq in running:
        computed = seq.num_computed_tokens
        if computed != len(seq.token_ids) - 1 or computed < seq.num_prompt_tokens:
            return None
        context += computed + 1

    manager = engine.block_manager
    block_size = manager.block_size

    def new_blocks(num_steps: int) -> int:
        return sum(
            -(-(seq.num_computed_tokens + num_steps) // block_size) - len(seq.block_table) for seq in running
        )

    free = manager.num_free_blocks
    if new_blocks(max_steps) > free:
        low, high = 0, max_steps  # new_blocks(low) <= free < new_blocks(high)
        while high - low > 1:
            middle = (low + high) // 2
            if new_blocks(middle) <= free:
                low = middle
            else:
                high = middle
        max_steps = low
        if max_steps < MIN_STEPS:
            return None

    num_seqs = len(running)
    # A pending arrival at or before a step's start would be admitted there: the run ends with the step
    # that ends at or after it.
    next_arrival = engine.next_arrival_time
    if engine.horizon is not None and (next_arrival is None or engine.horizon < next_arrival):
        next_arrival = engine.horizon
    times = _step_times(executor, now, num_seqs, context, max_steps, next_arrival)
    num_steps = len(times) - 1
    if num_steps < MIN_STEPS:
        return None

    tokens = array("i", [token]) * num_steps
    ends = times[1:]
    # Step j computes token position computed + j, and takes a block when that position starts one.
    allocations: list[tuple[int, int]] = []
    for index, seq in enumerate(running):
        seq.token_ids.extend(tokens)
        seq.token_times.extend(ends)
        first = len(seq.block_table) * block_size - seq.num_computed_tokens
        if first < num_steps:
            allocations += zip(range(first, num_steps, block_size), repeat(index))
    if num_seqs > 1:
        allocations.sort()
    used_before = manager.num_used_blocks
    if _registrations_commute(manager, running, num_steps):
        taken = manager.take(len(allocations))
        if num_seqs == 1:
            running[0].block_table += taken
        else:
            for (_, index), block_id in zip(allocations, taken):
                running[index].block_table.append(block_id)
        if manager.enable_prefix_caching:
            for seq in running:
                num_full = (seq.num_computed_tokens + num_steps) // block_size
                if num_full > seq.num_committed_blocks:  # else commit_blocks has nothing to do
                    manager.commit_blocks(seq, num_full)
    else:
        _allocate_and_register_in_step_order(manager, running, allocations, num_steps)

    for seq in running:
        seq.num_computed_tokens += num_steps
    first_step = scheduler.advance_steps(num_steps)
    end = times[-1]
    state_after_finish = None
    if num_steps == steps_to_first_finish:
        # As the scheduler's update does: every sequence advanced (and committed), then the finished
        # ones, in running order, marked and freed.
        finished = [(seq, reason) for seq in running if (reason := scheduler.finish_reason(seq, token)) is not None]
        for seq, reason in finished:
            scheduler.finish(seq, reason, end)
        engine.num_finished += len(finished)
        state_after_finish = (len(running), manager.num_used_blocks)
    engine.step_records.append_decode_run(
        first_step,
        times,
        num_seqs,
        context,
        used_before,
        [step for step, _ in allocations],
        manager.num_blocks,
        executor.cuda_graph_batch_size(num_seqs),
        state_after_finish,
        waiting,
    )
    engine.clock.sleep_until(end)
    return state_after_finish is not None and (next_arrival is None or end < next_arrival)


def _step_times(executor, now: float, num_seqs: int, context: int, max_steps: int, next_arrival) -> list[float]:
    """[start, end of step 0, end of step 1, ...] up to max_steps steps, through the step that reaches next_arrival.

    The clock adds one duration at a time (accumulate does the same float additions). Durations are
    asked for in chunks when an arrival may come first: the durations of a later chunk are, by the
    predictor's contract, those of the same steps asked for at once.
    """
    if next_arrival is None:
        return list(accumulate(executor.predict_decode_run(num_seqs, context, max_steps), initial=now))
    times = [now]
    done = 0
    chunk = min(max_steps, FIRST_CHUNK)
    while True:
        durations = executor.predict_decode_run(num_seqs, context + done * num_seqs, chunk)
        times += accumulate(durations, initial=times[-1])
        del times[done + 1]  # the chunk's start, already there
        if min(durations) >= 0:
            reached = bisect_left(times, next_arrival, done + 1)
        else:  # times not sorted: scan
            reached = next((i for i in range(done + 1, len(times)) if times[i] >= next_arrival), len(times))
        if reached < len(times):
            del times[reached + 1 :]
            return times
        done += chunk
        if done >= max_steps:
            return times
        # Guess the steps left until the arrival from the mean duration so far, with a margin.
        mean = (times[-1] - now) / done
        guess = int((next_arrival - times[-1]) / mean) + 8 if mean > 0 else max_steps
        chunk = min(max_steps - done, max(guess, FIRST_CHUNK))


def _registrations_commute(manager, running, num_steps: int) -> bool:
    """Whether this run's prefix-cache registrations may all follow its block allocations.

    Stepping interleaves them (a step's allocations, then its registrations). Doing all allocations
    first changes nothing unless a registered hash is also one an allocation may evict (a free cached
    block owns it) or two sequences register the same hash (the first registration wins).
    """
    if not manager.enable_prefix_caching:
        return True
    block_size = manager.block_size
    registered = []
    for seq in running:
        num_full = (seq.num_computed_tokens + num_steps) // block_size
        first = seq.num_committed_blocks
        # A deferring sequence registers no hash another sequence can meet (see BlockManager).
        if num_full > first and not manager.defers(seq):
            manager.ensure_hashes(seq, num_full)
            registered += seq.block_hashes[first:num_full]
    return not registered or manager.registers_independently(registered)


def _allocate_and_register_in_step_order(manager, running, allocations, num_steps: int) -> None:
    """Block allocations and prefix-cache registrations one at a time, in the order stepping makes them:
    by step, allocations before registrations, by running order."""
    block_size = manager.block_size
    events = [(step, 0, index) for step, index in allocations]
    if manager.enable_prefix_caching:
        for index, seq in enumerate(running):
            # After step j, computed + j + 1 tokens are in the cache: a new block is full from the first j
            # where that reaches past the committed blocks, then every block_size steps.
            first = (seq.num_committed_blocks + 1) * block_size - seq.num_computed_tokens - 1
            events.extend((step, 1, index) for step in range(max(first, 0), num_steps, block_size))
    events.sort()
    for step, phase, index in events:
        seq = running[index]
        if phase == 0:
            seq.block_table += manager.take(1)
        else:
            manager.commit_blocks(seq, (seq.num_computed_tokens + step + 1) // block_size)
