"""The server's Prometheus metrics, by vLLM's names (vllm/v1/metrics/loggers.py of vLLM 0.11), labelled
model_name and engine as vLLM's are.

Engine state (running and waiting requests, KV-cache usage, prefix-cache and preemption counts) is read
when /metrics is scraped (update_engine_state, then exposition), so the step loop pays nothing for it; request
latencies are observed when each request ends.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from twinfer.serving.engine_driver import EndedRequest

from engine.sequence import FinishReason

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)


def _token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's buckets for token counts)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exponent += 1


class _EngineStateCollector:
    """Gauges and counters of the engine's state as last read (engine_driver.engine_state's dict)."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.state = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "prefix_cache_queries": 0,
                      "prefix_cache_hits": 0, "preemptions": 0}

    def collect(self):
        names, values = list(self.labels), list(self.labels.values())
        state = self.state
        families = [
            (GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution batches.",
             state["running"]),
            (GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             state["waiting"]),
            (GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             state["kv_cache_usage"]),
            (CounterMetricFamily, "vllm:prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.", state["prefix_cache_queries"]),
            (CounterMetricFamily, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             state["prefix_cache_hits"]),
            (CounterMetricFamily, "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
             state["preemptions"]),
        ]
        for kind, name, documentation, value in families:
            family = kind(name, documentation, labels=names)
            family.add_metric(values, value)
            yield family


class ServerMetrics:
    """Every metric of one server, in a registry of its own (several servers may share a process in tests)."""

    def __init__(self, model_name: str, max_model_len: int) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        self._engine_state = _EngineStateCollector(labels)
        self.registry.register(self._engine_state)
        names = list(labels)

        def histogram(name: str, documentation: str, buckets) -> Histogram:
            return Histogram(name, documentation, names, buckets=buckets, registry=self.registry).labels(**labels)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, names, registry=self.registry).labels(**labels)

        token_buckets = _token_buckets(max_model_len)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          names + ["finished_reason"], registry=self.registry)
        self.request_success = {reason: success.labels(**labels, finished_reason=str(reason)) for reason in FinishReason}
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
        self.request_max_tokens = histogram("vllm:request_params_max_tokens",
                                            "Histogram of the max_tokens request parameter.", token_buckets)
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds",
                                             "Histogram of inter-token latency in seconds.", TOKEN_LATENCY_BUCKETS)
        self.request_time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.", TOKEN_LATENCY_BUCKETS)
        self.e2e_request_latency = histogram("vllm:e2e_request_latency_seconds",
                                             "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.request_queue_time = histogram("vllm:request_queue_time_seconds",
                                            "Histogram of time spent in WAITING phase for request.",
                                            REQUEST_LATENCY_BUCKETS)

    def update_engine_state(self, state: dict) -> None:
        """The engine's state as just read (engine_driver.engine_state's keys), for the next exposition."""
        self._engine_state.state = state

    def observe_finished(self, seq: EndedRequest) -> None:
        """Record an ended request (finished or aborted) as vLLM does: latencies from the engine's timestamps."""
        num_outputs = seq.num_output_tokens
        self.prompt_tokens.inc(seq.num_prompt_tokens - seq.num_cached_tokens)
        self.generation_tokens.inc(num_outputs)
        if seq.finish_reason is not None:
            self.request_success[seq.finish_reason].inc()
        self.request_prompt_tokens.observe(seq.num_prompt_tokens)
        self.request_generation_tokens.observe(num_outputs)
        self.request_max_tokens.observe(seq.max_tokens)
        if seq.first_scheduled_time is not None:
            self.request_queue_time.observe(seq.first_scheduled_time - seq.arrival_time)
        if seq.first_token_time is not None:
            self.time_to_first_token.observe(seq.first_token_time - seq.arrival_time)
        times = seq.token_times
        for earlier, later in zip(times, times[1:]):
            self.inter_token_latency.observe(later - earlier)
        if seq.finish_time is not None:
            self.e2e_request_latency.observe(seq.finish_time - seq.arrival_time)
            if num_outputs > 1 and seq.first_token_time is not None:
                self.request_time_per_output_token.observe(
                    (seq.finish_time - seq.first_token_time) / (num_outputs - 1))

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
