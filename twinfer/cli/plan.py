"""`twinfer plan`: capacity planning, which GPUs and configurations serve a trace within its SLOs."""

import argparse


def register(commands) -> None:
    parser = commands.add_parser("plan", help="capacity planning: GPUs and configs to serve a trace within SLOs")
    parser.add_argument("trace")
    parser.add_argument("--format", default=None)
    parser.add_argument("--model", required=True)
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--tp", default="1")
    parser.add_argument("--max-num-seqs", default=None)
    parser.add_argument("--slo", required=True, help="e.g. ttft_p99=2000,tpot_p99=100 (ms)")
    parser.add_argument("--target-rate", type=float, required=True, help="requests per second to serve")
    parser.add_argument("--price", default=None, help="e.g. h100=2.5,h200=3.5 ($ per GPU-hour)")
    parser.add_argument("--router", default="least-outstanding")
    parser.add_argument("--max-requests", type=int, default=None, help="keep the first N requests of the trace")
    parser.add_argument("--duration", type=float, default=None, help="keep requests arriving in the first S seconds")
    parser.add_argument("--max-prompt-len", type=int, default=None, help="clip prompt lengths (reported)")
    parser.add_argument("--max-output-len", type=int, default=None, help="clip output lengths (reported)")
    parser.add_argument("--search-requests", type=int, default=None,
                      help="search each config's max rate on the trace's busiest N consecutive requests (default 1000)")
    parser.add_argument("--verify-top", type=int, default=3,
                      help="verify the K cheapest configs on the whole trace at the target rate (0: none)")
    parser.add_argument("--search-steps", type=int, default=6, help="bisection steps after bracketing the rate")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default="plan")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--ray", default=None, metavar="ADDRESS", help="run the sweep on a Ray cluster")


def run(args: argparse.Namespace) -> int:
    from simulator.planner import plan_cli

    return plan_cli(args)
