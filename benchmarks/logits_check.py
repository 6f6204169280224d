"""twinfer against transformers on the GPU: bf16 Qwen3-0.6B-shaped dummy weights saved as safetensors and
loaded by both; last-token logits relative error (target < 2e-2) and greedy agreement.

    python benchmarks/logits_check.py --out logits.json
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch


def run_logits_check(model: str = "qwen3-0.6b", *, num_prompts: int = 8, new_tokens: int = 32, seed: int = 0,
                     attention_backend: str = "auto", out: str | None = None) -> dict:
    """Compare last-token logits and greedy continuations; print and return the figures."""
    import transformers

    from engine import LLM, SamplingParams
    from engine.loader import save_dummy_checkpoint
    from engine.model_config import load_model_config
    from engine.models import attention_features
    from engine.scheduler_output import ScheduledSequence, SchedulerOutput

    config = load_model_config(model)
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(16, 600))] for _ in range(num_prompts)]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "config.json").write_text(Path(config.source).read_text())
        qkv_bias, qk_norm = attention_features(config.architecture, config.attention_bias)
        save_dummy_checkpoint(config, folder, qkv_bias=qkv_bias, qk_norm=qk_norm, seed=seed, dtype=torch.bfloat16,
                              device="cuda")
        reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
        llm = LLM(folder, dtype="bfloat16", max_model_len=2048, attention_backend=attention_backend,
                  gpu_memory_utilization=0.5, max_num_seqs=64)

    runner = llm.executor.runner
    errors = []
    with torch.inference_mode():
        for index, prompt in enumerate(prompts):
            blocks = list(range(-(-len(prompt) // runner.block_size)))
            seq = ScheduledSequence(index, prompt, 0, blocks, False, True, 0, SamplingParams(temperature=0))
            step = runner.prepare(SchedulerOutput(0, [seq]))
            hidden = runner.hidden_states(step)  # the step's real path
            ours = runner.model.compute_logits(hidden[step.logit_rows])[0].float()
            theirs = reference(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
            errors.append(((ours - theirs).norm() / theirs.norm()).item())

    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    ours_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    agree_prefix, exact = [], 0
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, ours_tokens):
            generated = reference.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=new_tokens,
                                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            theirs = generated[0, len(prompt):].tolist()
            same = next((i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b), len(tokens))
            agree_prefix.append(same)
            exact += same == len(tokens)
    result = {
        "gpu": torch.cuda.get_device_name(), "model": model, "attention_backend": llm.executor.attention_backend,
        "max_relative_error": max(errors), "mean_relative_error": sum(errors) / len(errors),
        "relative_errors": errors, "greedy_exact_share": exact / len(prompts),
        "greedy_agreeing_prefix_tokens": agree_prefix, "new_tokens": new_tokens,
        "pass": max(errors) < 2e-2,
    }
    print(f"logits check on {result['gpu']} ({result['attention_backend']}): max rel. error "
          f"{result['max_relative_error']:.2e} (target < 2e-2), greedy equal over {new_tokens} tokens for "
          f"{exact}/{len(prompts)} prompts, agreeing prefixes {agree_prefix}")
    llm.shutdown()
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    run_logits_check(args.model, attention_backend=args.attention_backend, out=args.out)


if __name__ == "__main__":
    main()
