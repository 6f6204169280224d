"""On a GPU: LLM.generate interrupted (inside a step on the device, or between steps) leaves the LLM as a fresh one.

For each scheduling mode (asynchronous, where a step is in flight on the device when the interrupt comes, and
synchronous) and each of --trials interrupt points, one LLM is interrupted in the middle of a batch, then
generates a second batch; its outputs must equal those of an LLM that was never interrupted, token for token
(greedy, dummy weights of a real model's shape). Prints one JSON line per mode and exits 1 on any mismatch.

    python benchmarks/interrupt_check.py --model qwen3-0.6b --trials 8
"""

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLM, SamplingParams  # noqa: E402
from tests.interrupt_in_llm import Interrupt  # noqa: E402


def _prompts(rng: random.Random, count: int, vocab: int) -> list[list[int]]:
    margin = min(100, vocab // 4)  # clear of special ids at either end, in a tiny vocabulary too
    return [[rng.randrange(margin, vocab - margin) for _ in range(rng.randrange(16, 600))] for _ in range(count)]


def _interrupted_generate(llm: LLM, prompts, params, where: str, at: int) -> None:
    """Raise KeyboardInterrupt at the at-th model launch or after the at-th engine step, as Ctrl-C would."""
    with Interrupt(llm, where, at, KeyboardInterrupt()):
        try:
            llm.generate(prompts, params, use_tqdm=False)
        except KeyboardInterrupt:
            pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", help="cpu: a check of this script (a small --model folder)")
    args = parser.parse_args(argv)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    failed = False
    for asynchronous in (True, False):
        keywords = dict(load_format="dummy", async_scheduling=asynchronous, max_num_seqs=64, device=args.device)
        if args.device == "cuda":
            # Two LLMs share the GPU: a fixed cache each (48 prompts of at most 664 tokens need ~2,000 blocks),
            # since the second one's sizing would find the first one's cache taking the memory.
            keywords["num_gpu_blocks_override"] = 4096
        fresh, victim = LLM(args.model, **keywords), LLM(args.model, **keywords)
        vocab = victim.model_config.vocab_size
        rng = random.Random(args.seed)
        mismatches, started = 0, time.perf_counter()
        for trial in range(args.trials):
            _interrupted_generate(victim, _prompts(rng, 48, vocab), params, rng.choice(["model", "between"]),
                                  rng.randrange(1, 60))
            engine = victim.engine
            clean = not engine.has_unfinished() and engine.block_manager.holds_nothing()
            then = _prompts(rng, 32, vocab)
            same = [o.outputs[0].token_ids for o in victim.generate(then, params, use_tqdm=False)] == \
                [o.outputs[0].token_ids for o in fresh.generate(then, params, use_tqdm=False)]
            mismatches += not (clean and same)
        print(json.dumps({"async_scheduling": asynchronous, "trials": args.trials, "mismatches": mismatches,
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
        failed |= mismatches > 0
        victim.shutdown()
        fresh.shutdown()
        del victim, fresh, engine
        gc.collect()  # the next mode's two LLMs need this mode's memory back
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
