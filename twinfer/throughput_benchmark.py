"""Offline throughput on nano-vLLM's workload, next to transformers and the roofline bound of the same GPU.

Workload: 256 sequences, prompt and output lengths uniform in 100..1024, random token ids, ignore_eos,
temperature 0.6, seed 0, Qwen3-0.6B shape with dummy weights, bf16. The roofline reads the weights and
each decode step's KV cache at the device-copy bandwidth measured in this run, plus the prefill FLOPs at
the bf16 matmul rate measured in this run.

    python benchmarks/throughput.py --out throughput.json [--no-transformers]
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch


def make_workload(num_seqs: int = 256, min_len: int = 100, max_len: int = 1024, seed: int = 0,
                  vocab_limit: int = 10000) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths), drawn as nano-vLLM's bench.py does."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab_limit) for _ in range(rng.randint(min_len, max_len))] for _ in range(num_seqs)]
    output_lens = [rng.randint(min_len, max_len) for _ in range(num_seqs)]
    return prompts, output_lens


def measure_copy_bandwidth(device: str = "cuda", size_bytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * size_bytes * iters / (time.perf_counter() - start)


def measure_matmul_rate(device: str = "cuda", n: int = 8192, iters: int = 20) -> float:
    """bf16 matmul rate in FLOP/s on n x n x n."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def roofline_seconds(config, prompt_lens: list[int], output_lens: list[int], bandwidth: float, flops: float,
                     dtype_bytes: int = 2) -> dict:
    """Lower bound on the run's time: every decode step reads the weights and the KV of every running sequence.

    All sequences decode together (the cache holds them all), so step t runs the sequences with more than
    t outputs; the first token of each comes from its prefill.
    """
    weight_bytes = config.num_params * dtype_bytes
    kv_per_token = config.kv_bytes_per_token(dtype_bytes)
    max_steps = max(output_lens) - 1
    # Sequences decoding at step t (1-based): those with output_len > t.
    kv_tokens = 0
    decode_steps = 0
    for t in range(1, max_steps + 1):
        active = [(p, o) for p, o in zip(prompt_lens, output_lens) if o > t]
        if not active:
            break
        decode_steps += 1
        kv_tokens += sum(p + t for p, _ in active)
    memory_seconds = (decode_steps * weight_bytes + kv_tokens * kv_per_token) / bandwidth
    hidden_layers = config.num_hidden_layers
    attn_width = config.num_attention_heads * config.head_dim
    linear_flops = 2 * config.num_params * sum(prompt_lens)
    # Causal attention: QK^T and PV over half the square, per layer.
    attention_flops = sum(2 * 2 * hidden_layers * attn_width * p * p / 2 for p in prompt_lens)
    compute_seconds = (linear_flops + attention_flops) / flops
    return {"decode_steps": decode_steps, "memory_seconds": memory_seconds, "prefill_seconds": compute_seconds,
            "seconds": memory_seconds + compute_seconds}


def run_twinfer(model: str, prompts, output_lens, *, dtype: str, max_model_len: int, enforce_eager: bool,
                **llm_options) -> dict:
    """twinfer's output tokens per second on the workload, after a warm-up generate."""
    from engine import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager, **llm_options)
    init_seconds = time.perf_counter() - start
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in output_lens]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    first_step = len(llm.engine.step_records)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = llm.engine.step_records[first_step:]
    graph_steps = sum(1 for s in steps if s.cuda_graph_batch_size)
    kinds: dict[str, list[float]] = {}
    for step in steps:
        kind = ("graph" if step.cuda_graph_batch_size else
                "mixed" if step.num_prefill_seqs and step.num_decode_seqs else
                "prefill" if step.num_prefill_seqs else "eager decode")
        entry = kinds.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += step.duration
    slowest = sorted(steps, key=lambda s: s.duration, reverse=True)[:8]
    result = {
        "output_tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
        "step_seconds_by_kind": {k: {"steps": n, "seconds": t} for k, (n, t) in kinds.items()},
        "slowest_steps": [{"duration": s.duration, "prefill_tokens": s.num_prefill_tokens,
                           "decode_seqs": s.num_decode_seqs, "graph": s.cuda_graph_batch_size} for s in slowest],
        "init_seconds": init_seconds, "num_kv_blocks": llm.executor.num_kv_blocks,
        "attention_backend": llm.executor.attention_backend, "steps": len(steps), "cuda_graph_steps": graph_steps,
        "mixed_cuda_graphs": llm.executor.mixed_cuda_graphs,  # resolved: options may hold None (the default)
    }
    llm.shutdown()
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def run_transformers(model_config, prompts, output_lens, seed: int = 0, time_limit: float = 240.0) -> dict:
    """transformers' continuous-batching generate_batch on the same dummy weights (padded generate if absent)."""
    import transformers

    from engine.loader import save_dummy_checkpoint
    from engine.models import attention_features

    with tempfile.TemporaryDirectory() as folder:
        raw = json.loads(Path(model_config.source).read_text())
        Path(folder, "config.json").write_text(json.dumps(raw))
        qkv_bias, qk_norm = attention_features(model_config.architecture, model_config.attention_bias)
        save_dummy_checkpoint(model_config, folder, qkv_bias=qkv_bias, qk_norm=qk_norm, seed=seed,
                              dtype=torch.bfloat16, device="cuda")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    # generate_batch takes one max_new_tokens: the workload's mean keeps the total output the same.
    mean_output = round(sum(output_lens) / len(output_lens))
    config = transformers.GenerationConfig(max_new_tokens=mean_output, do_sample=True, temperature=0.6,
                                           top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    result = {"transformers_version": transformers.__version__, "max_new_tokens": mean_output}
    if hasattr(model, "generate_batch"):
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            outputs = model.generate_batch(inputs=prompts, generation_config=config)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.generated_tokens) for o in outputs.values())
            result.update(method="generate_batch", output_tokens=tokens, seconds=seconds,
                          tokens_per_second=tokens / seconds)
            return result
        except Exception as error:  # fall back to padded generate, and say why
            result["generate_batch_error"] = repr(error)[:500]
    # Padded batched generate over as many batches of 64 as fit in the time limit.
    tokens, seconds = 0, 0.0
    for first in range(0, len(prompts), 64):
        batch = prompts[first:first + 64]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        tokens += (out.shape[1] - width) * len(batch)
        if seconds > time_limit:
            break
    result.update(method="padded generate, batches of 64", output_tokens=tokens, seconds=seconds,
                  tokens_per_second=tokens / seconds)
    return result


def run_throughput(model: str = "qwen3-0.6b", *, num_seqs: int = 256, seed: int = 0, dtype: str = "bfloat16",
                   max_model_len: int = 4096, enforce_eager: bool = False, with_transformers: bool = True,
                   out: str | None = None, **llm_options) -> dict:
    """Run the whole comparison on the current GPU; print the table and return (and optionally write) the figures."""
    from engine.model_config import load_model_config

    model_config = load_model_config(model)
    prompts, output_lens = make_workload(num_seqs=num_seqs, seed=seed)
    llm_options.setdefault("max_num_seqs", num_seqs)
    results = {"model": model, "gpu": torch.cuda.get_device_name(), "num_seqs": num_seqs, "options": llm_options,
               "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(output_lens)}
    results["twinfer"] = run_twinfer(model, prompts, output_lens, dtype=dtype, max_model_len=max_model_len,
                                     enforce_eager=enforce_eager, **llm_options)
    bandwidth, flops = measure_copy_bandwidth(), measure_matmul_rate()
    bound = roofline_seconds(model_config, [len(p) for p in prompts], output_lens, bandwidth, flops)
    results["roofline"] = {"copy_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": flops, **bound,
                           "tokens_per_second": sum(output_lens) / bound["seconds"]}
    if with_transformers:
        try:
            results["transformers"] = run_transformers(model_config, prompts, output_lens, seed)
        except Exception as error:
            results["transformers"] = {"error": repr(error)[:1000]}
    ours = results["twinfer"]["tokens_per_second"]
    roof = results["roofline"]["tokens_per_second"]
    theirs = results.get("transformers", {}).get("tokens_per_second")
    print(f"GPU: {results['gpu']}   model: {model} (dummy weights, {dtype})   "
          f"copy {bandwidth / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s")
    print(f"{'engine':<14}{'output tok/s':>14}{'% of roofline':>16}")
    print(f"{'twinfer':<14}{ours:>14,.0f}{100 * ours / roof:>15.1f}%")
    if theirs:
        print(f"{'transformers':<14}{theirs:>14,.0f}{100 * theirs / roof:>15.1f}%")
    print(f"{'roofline':<14}{roof:>14,.0f}{100.0:>15.1f}%")
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                        help="overlap the host's scheduling with the GPU (the LLM class's default)")
    parser.add_argument("--mixed-cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="steps with prompt chunks as CUDA graphs too (default: the LLM class's, on at TP 1)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    run_throughput(args.model, num_seqs=args.num_seqs, dtype=args.dtype, max_model_len=args.max_model_len,
                   enforce_eager=args.enforce_eager, with_transformers=not args.no_transformers, out=args.out,
                   async_scheduling=args.async_scheduling, mixed_cuda_graphs=args.mixed_cuda_graphs)


if __name__ == "__main__":
    main()
