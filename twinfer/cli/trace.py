"""`twinfer trace export`: a trace (any format twinfer reads) written as one of vLLM's benchmark datasets."""

import argparse
import logging

log = logging.getLogger("twinfer")

EXPORT_FORMATS = ("vllm-custom",)


def register(commands) -> None:
    parser = commands.add_parser("trace", help="trace files: export to vLLM's benchmark dataset formats")
    actions = parser.add_subparsers(dest="trace_command", required=True, parser_class=type(parser),
                                    help="what to do with the trace")
    export = actions.add_parser("export", help="write a trace as vLLM's custom dataset (JSON lines of prompt text and "
                                "output_tokens), for `vllm bench serve --dataset-name custom`")
    export.add_argument("trace", help="a trace file, a bundled sample (azure-conv, mooncake-conv, demo) or a "
                        "synthetic workload spec")
    export.add_argument("--format", default="vllm-custom", choices=EXPORT_FORMATS, help="the format written")
    export.add_argument("--out", required=True, help="the file to write (.jsonl)")
    export.add_argument("--tokenizer", required=True,
                        help="tokenizer (folder or cached Hub id) decoding the prompts' token ids into text: the one "
                        "of the model vLLM will serve")
    export.add_argument("--input-format", default=None, help="the trace's format (default: detected)")
    export.add_argument("--max-requests", type=int, default=None, help="keep the first N requests")
    export.add_argument("--seed", type=int, default=0, help="seed of the synthesized prompt tokens")


def run(args: argparse.Namespace) -> int:
    """Read, export and say what vLLM needs to replay it faithfully."""
    from traces.text_length import load_tokenizer
    from traces.trace_options import TraceOptions, load_trace
    from traces.vllm_custom import write_vllm_custom

    tokenizer = load_tokenizer(args.tokenizer)
    trace = load_trace(args.trace, TraceOptions(format=args.input_format, max_requests=args.max_requests,
                                                seed=args.seed))
    written = write_vllm_custom(trace, args.out, tokenizer, seed=args.seed)
    print(f"wrote {written['rows']} requests of {trace.name} to {args.out} (vLLM custom dataset)")
    if written["length_mismatches"]:
        log.warning(f"{written['length_mismatches']} of {written['rows']} prompts re-tokenize to another length than "
                    f"the trace's (at most {written['max_length_difference']} tokens off): decoded token ids need not "
                    "round-trip")
    print("replay it in order and at its lengths: vllm bench serve --dataset-name custom --dataset-path "
          f"{args.out} --num-prompts {written['rows']} --disable-shuffle --skip-chat-template (arrival times are "
          "not part of this format: give --request-rate)")
    return 0
