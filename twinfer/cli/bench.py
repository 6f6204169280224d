"""`twinfer bench throughput`: offline throughput on nano-vLLM's workload, against the roofline (GPU);
`twinfer bench serve`: a trace against an OpenAI-compatible server (twinfer.cli.bench_serve)."""

import argparse

from twinfer.cli import bench_serve


def register(commands) -> None:
    parser = commands.add_parser("bench", help="benchmarks: offline throughput, or a trace against a server")
    which = parser.add_subparsers(dest="which", required=True, parser_class=type(parser), help="the benchmark")
    throughput = which.add_parser("throughput", help="offline throughput on nano-vLLM's workload, against the "
                                  "roofline (GPU)")
    throughput.add_argument("--model", default="qwen3-0.6b", help="preset name or model folder (dummy weights)")
    throughput.add_argument("--json", default=None, help="also write the results as JSON here")
    throughput.add_argument("--num-seqs", type=int, default=256, help="sequences in the workload")
    bench_serve.register(which)


def run(args: argparse.Namespace) -> int:
    if args.which == "serve":
        return bench_serve.run(args)
    from twinfer.cli.cuda_required import require_cuda

    require_cuda("`twinfer bench throughput`", "on a CPU, measure a trace with `twinfer replay TRACE --executor cpu` "
                 "or predict a GPU's with `--executor sim`")
    from twinfer.throughput_benchmark import main as throughput

    argv = ["--model", args.model, "--num-seqs", str(args.num_seqs)]
    if args.json:
        argv += ["--out", args.json]
    throughput(argv)
    return 0
