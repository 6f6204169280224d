"""`twinfer bench throughput`: offline throughput on nano-vLLM's workload, against the roofline (GPU)."""

import argparse


def register(commands) -> None:
    parser = commands.add_parser("bench", help="benchmarks")
    parser.add_argument("which", choices=["throughput"], help="the benchmark: throughput (offline, nano-vLLM's "
                        "workload, against the roofline)")
    parser.add_argument("--model", default="qwen3-0.6b", help="preset name or model folder (dummy weights)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--num-seqs", type=int, default=256, help="sequences in the workload")


def run(args: argparse.Namespace) -> int:
    from twinfer.cli.cuda_required import require_cuda

    require_cuda("`twinfer bench throughput`", "on a CPU, measure a trace with `twinfer replay TRACE --executor cpu` "
                 "or predict a GPU's with `--executor sim`")
    from twinfer.throughput_benchmark import main as throughput

    argv = ["--model", args.model, "--num-seqs", str(args.num_seqs)]
    if args.json:
        argv += ["--out", args.json]
    throughput(argv)
    return 0
