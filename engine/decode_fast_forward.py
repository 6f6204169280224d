"""Skipping through runs of identical pure-decode steps when an executor can predict them.

A cost-model executor knows a decode step's duration without running anything, so long stretches
where the same sequences just decode (no arrival, no finish, no preemption) can be applied in bulk.
Every effect of stepping one by one is reproduced in the same order: block allocations at block
boundaries, prefix-cache registrations, token times, clock arithmetic and one step record per step.
"""

from typing import Protocol

MIN_STEPS = 2


class DecodeRunPredictor(Protocol):
    """An executor that can tell how long a run of pure-decode steps takes without executing them."""

    token_id: int
    """The token it returns for every sampling sequence."""

    def predict_decode_run(self, num_decode_seqs: int, decode_context_tokens: int, num_steps: int) -> list[float]:
        """Durations of num_steps decode steps whose total context grows by num_decode_seqs a step;
        bit for bit what execute() would report for each."""
        ...

    def cuda_graph_batch_size(self, num_decode_seqs: int) -> int:
        """The CUDA-graph batch size execute() reports for a pure-decode step of this many sequences."""
        ...


def fast_forward_decodes(engine, now: float) -> bool:
    """Apply as many pure-decode steps as can be proven identical to stepping; False if none."""
    scheduler = engine.scheduler
    running = scheduler.running
    config = engine.config
    if scheduler.waiting or not running or len(running) > config.max_num_batched_tokens:
        return False
    executor = engine.executor
    token = executor.token_id
    eos_ids = config.eos_token_ids
    max_steps = None
    for seq in running:
        computed = seq.num_computed_tokens
        if computed != len(seq.token_ids) - 1 or computed < seq.num_prompt_tokens:
            return False
        params = seq.sampling_params
        if token in params.stop_token_ids or (not params.ignore_eos and token in eos_ids):
            return False
        # The step that finishes a sequence runs normally; stop one before it.
        remaining = params.max_tokens - (len(seq.token_ids) - seq.num_prompt_tokens) - 1
        if max_steps is None or remaining < max_steps:
            max_steps = remaining
    if max_steps < MIN_STEPS:
        return False

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
            return False

    num_seqs = len(running)
    cuda_graph_batch_size = executor.cuda_graph_batch_size(num_seqs)
    context = sum(seq.num_computed_tokens + 1 for seq in running)
    durations = executor.predict_decode_run(num_seqs, context, max_steps)
    # Step j starts at starts[j]; a pending arrival at or before a start would be admitted there.
    pending = engine._pending
    next_arrival = pending[0][0] if pending else None
    if engine.horizon is not None and (next_arrival is None or engine.horizon < next_arrival):
        next_arrival = engine.horizon
    starts = [now]
    ends = []
    clock_time = now
    for duration in durations:
        clock_time += duration
        ends.append(clock_time)
        if next_arrival is not None and clock_time >= next_arrival:
            break
        starts.append(clock_time)
    num_steps = len(ends)
    if num_steps < MIN_STEPS:
        return False

    # Block allocations (at schedule time) and prefix-cache registrations (at update time), in the
    # order stepping would make them: by step, allocations before registrations, by running order.
    events = []
    commit = manager.enable_prefix_caching
    for index, seq in enumerate(running):
        computed = seq.num_computed_tokens
        # Step j computes token position computed + j; it needs a block when that position starts one.
        first = (-computed) % block_size
        for step in range(first, num_steps, block_size):
            events.append((step, 0, index))
        if commit:
            # After step j, computed + j + 1 tokens are in the cache; a block fills when that is a multiple.
            first = (block_size - (computed + 1) % block_size) % block_size
            for step in range(first, num_steps, block_size):
                events.append((step, 1, index))
    events.sort()

    for seq in running:
        seq.token_ids.extend([token] * num_steps)
        seq.token_times.extend(ends)

    used = manager.num_used_blocks
    used_after_step = []
    event_index = 0
    num_events = len(events)
    for step in range(num_steps):
        while event_index < num_events and events[event_index][0] == step:
            _, phase, index = events[event_index]
            seq = running[index]
            if phase == 0:
                seq.block_table.append(manager._take_free_block())
                used += 1
            else:
                _register_through(manager, seq, (seq.num_computed_tokens + step + 1) // block_size)
            event_index += 1
        used_after_step.append(used)

    first_step = scheduler._step
    zeros = [0] * num_steps
    engine.step_records.extend(
        step=range(first_step, first_step + num_steps),
        start_time=starts[:num_steps],
        duration=[end - start for start, end in zip(starts, ends)],
        num_prefill_seqs=zeros,
        num_prefill_tokens=zeros,
        num_decode_seqs=[num_seqs] * num_steps,
        num_decode_tokens=[num_seqs] * num_steps,
        decode_context_tokens=range(context, context + num_steps * num_seqs, num_seqs),
        prefill_context_tokens=zeros,
        prefill_attention_work=[0.0] * num_steps,
        num_running=[num_seqs] * num_steps,
        num_waiting=zeros,
        kv_blocks_used=used_after_step,
        kv_blocks_total=[manager.num_blocks] * num_steps,
        num_preempted=zeros,
        prefix_cache_hit_tokens=zeros,
        cuda_graph_batch_size=[cuda_graph_batch_size] * num_steps,
        num_batched_tokens=[num_seqs] * num_steps,
    )
    for seq in running:
        seq.num_computed_tokens += num_steps
    scheduler._step += num_steps
    engine.clock.sleep_until(ends[-1])
    return True


def _register_through(manager, seq, num_full_blocks: int) -> None:
    """Register seq's full blocks up to num_full_blocks in the prefix cache (as commit_computed would)."""
    saved = seq.num_computed_tokens
    seq.num_computed_tokens = num_full_blocks * manager.block_size
    manager.commit_computed(seq)
    seq.num_computed_tokens = saved

