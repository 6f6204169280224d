"""Tensor parallelism check on a 2-GPU machine: TP=2 greedy outputs against TP=1 on the same dummy weights
(bf16): the share of prompts whose first 16 generated tokens are equal.

    python benchmarks/tp_check.py --out tp.json
"""

import argparse
import gc
import json
import random
import time
from pathlib import Path

import torch


def _greedy(model: str, prompts, new_tokens: int, tensor_parallel_size: int, enforce_eager: bool) -> tuple[list, dict]:
    from engine import LLM, SamplingParams

    start = time.perf_counter()
    # Progress goes out at once: when a run is cut off, the last line says which phase it was in.
    print(f"TP={tensor_parallel_size}: building the engine (CUDA graphs {'off' if enforce_eager else 'on'})",
          flush=True)
    llm = LLM(model, dtype="bfloat16", max_model_len=2048, tensor_parallel_size=tensor_parallel_size,
              gpu_memory_utilization=0.5, max_num_seqs=64, enforce_eager=enforce_eager)
    init = time.perf_counter() - start
    print(f"TP={tensor_parallel_size}: built in {init:.1f} s; generating", flush=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
                           use_tqdm=False)
    info = {"init_seconds": init, "generate_seconds": time.perf_counter() - start,
            "num_kv_blocks": llm.executor.num_kv_blocks}
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outputs], info


def run_tp_check(model: str = "qwen3-0.6b", *, num_prompts: int = 32, new_tokens: int = 16, seed: int = 0,
                 enforce_eager: bool = False, out: str | None = None) -> dict:
    """Greedy at TP=1 then TP=2; print and return the share of prompts that agree."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(16, 512))] for _ in range(num_prompts)]
    single, info_1 = _greedy(model, prompts, new_tokens, 1, enforce_eager)
    double, info_2 = _greedy(model, prompts, new_tokens, 2, enforce_eager)
    equal = sum(a == b for a, b in zip(single, double))
    first_token = sum(a[0] == b[0] for a, b in zip(single, double))
    result = {"gpu": torch.cuda.get_device_name(), "model": model, "num_prompts": num_prompts,
              "new_tokens": new_tokens, "equal_share": equal / num_prompts,
              "first_token_equal_share": first_token / num_prompts, "tp1": info_1, "tp2": info_2}
    print(f"TP=2 vs TP=1 on {result['gpu']}: {equal}/{num_prompts} prompts equal over {new_tokens} tokens "
          f"(first token equal for {first_token}/{num_prompts})")
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    run_tp_check(args.model, enforce_eager=args.enforce_eager, out=args.out)


if __name__ == "__main__":
    main()
