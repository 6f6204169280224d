"""The printed summary of a run, in vLLM benchmark_serving's layout (the result JSON: twinfer/result_json.py)."""

from analysis.metrics import GOODPUT_METRICS, Distribution, Metrics, check_goodput_slos

DEFAULT_PERCENTILES = (99.0,)
SUMMARY_METRICS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def percentile_word(p: float) -> str:
    """vLLM's spelling of a percentile in labels and keys: 99 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if int(p) == p else str(p)


def _line(label: str, value) -> str:
    if isinstance(value, float):
        return "{:<40} {:<10.2f}".format(label, value)
    return "{:<40} {:<10}".format(label, value)


def format_summary(
    metrics: Metrics,
    percentiles=DEFAULT_PERCENTILES,
    shown=("ttft", "tpot", "itl", "e2el"),
    title: str = " Serving Benchmark Result ",
) -> str:
    """The summary as vLLM's benchmark_serving prints it (labels, widths, ms), so its parsers read it."""
    lines = ["{s:{c}^{n}}".format(s=title, n=50, c="=")]
    lines.append(_line("Successful requests:", metrics.completed))
    lines.append(_line("Failed requests:", metrics.failed))
    if metrics.num_unfinished:
        lines.append(_line("Unfinished requests:", metrics.num_unfinished))
    lines.append(_line("Benchmark duration (s):", metrics.duration))
    lines.append(_line("Total input tokens:", metrics.total_input_tokens))
    lines.append(_line("Total generated tokens:", metrics.total_output_tokens))
    lines.append(_line("Request throughput (req/s):", metrics.request_throughput))
    if metrics.request_goodput is not None:
        lines.append(_line("Request goodput (req/s):", metrics.request_goodput))
    lines.append(_line("Output token throughput (tok/s):", metrics.output_throughput))
    lines.append(_line("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s))
    lines.append(_line("Peak concurrent requests:", float(metrics.max_concurrent_requests)))
    lines.append(_line("Total Token throughput (tok/s):", metrics.total_token_throughput))
    for key, name, header in SUMMARY_METRICS:
        if key not in shown:
            continue
        distribution: Distribution = getattr(metrics, key)
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        lines.append(_line(f"Mean {name} (ms):", distribution.mean * 1000))
        lines.append(_line(f"Median {name} (ms):", distribution.median * 1000))
        for p in percentiles:
            lines.append(_line(f"P{percentile_word(p)} {name} (ms):", distribution.percentile(p) * 1000))
    lines.append("=" * 50)
    return "\n".join(lines)


def print_summary(metrics: Metrics, percentiles=DEFAULT_PERCENTILES, shown=("ttft", "tpot", "itl", "e2el")) -> None:
    """Print format_summary()."""
    print(format_summary(metrics, percentiles, shown))


def parse_goodput(pairs) -> dict[str, float]:
    """SLOs from vLLM's --goodput form, e.g. ["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (ms)."""
    if isinstance(pairs, str):
        pairs = pairs.replace(",", " ").split()
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = str(pair).partition(":")
        name = name.strip().lower()
        if not sep or not name or not value.strip():
            raise ValueError(
                f"invalid goodput SLO {pair!r}: expected METRIC:MILLISECONDS with METRIC one of "
                f"{', '.join(GOODPUT_METRICS)}, e.g. ttft:500"
            )
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"invalid goodput SLO {pair!r}: {value!r} is not a number of milliseconds") from None
        if name in slos:
            raise ValueError(f"goodput SLO {name} given twice ({pair!r})")
        slos[name] = number
    return check_goodput_slos(slos)
