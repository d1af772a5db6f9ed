"""Prometheus metrics with TGI's exact names, types, labels and buckets.

prometheus_client renames counters to `*_total`, which would break the
dashboards and autoscaling rules written for TGI (`tgi_request_count`), so
the few metric kinds are implemented here and rendered in the text format
0.0.4. Everything runs on the event loop thread, so there are no locks.
"""

from __future__ import annotations

import bisect
import math
import re

LabelKey = tuple[str, ...]


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(names: tuple[str, ...], values: LabelKey, extra: str = "") -> str:
    parts = [f'{n}="{v}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.doc, self.label_names = name, doc, labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, doc, labels)
        self.values: dict[LabelKey, float] = {} if labels else {(): 0.0}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in self.values.items()]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, doc: str, buckets: list[float], labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, doc, labels)
        self.buckets = sorted(buckets)
        self.series: dict[LabelKey, list] = {}

    def observe(self, value: float, *labels: str) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [[0] * len(self.buckets), 0.0, 0]
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            s[0][i] += 1
        s[1] += value
        s[2] += 1

    def count(self, *labels: str) -> int:
        s = self.series.get(labels)
        return s[2] if s else 0

    def render(self) -> list[str]:
        out = []
        for key, (counts, total, n) in self.series.items():
            running = 0
            for bound, c in zip(self.buckets, counts):
                running += c
                le = _labels(self.label_names, key, f'le="{_fmt(bound)}"')
                out.append(f"{self.name}_bucket{le} {running}")
            inf = _labels(self.label_names, key, 'le="+Inf"')
            out.append(f"{self.name}_bucket{inf} {n}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_fmt(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {n}")
        return out


def render(metrics: list[_Metric]) -> str:
    """The exposition text of `metrics`, each with its HELP and TYPE lines."""
    lines: list[str] = []
    for metric in metrics:
        lines.extend(metric.header())
        lines.extend(metric.render())
    return "\n".join(lines) + "\n"


def duration_buckets() -> list[float]:
    """TGI's 35 geometric buckets from 0.1 ms by a factor 1.5 (seconds)."""
    return [1e-4 * 1.5**i for i in range(35)]


def linear_buckets(maximum: int, n: int = 100) -> list[float]:
    return [maximum / n * (i + 1) for i in range(n)]


class Metrics:
    """The router's registry; buckets depend on the limits fixed at start."""

    def __init__(self, max_input_tokens: int, max_total_tokens: int) -> None:
        d = duration_buckets()
        m = "method"
        self.request_count = Counter("tgi_request_count", "Requests received")
        self.request_success = Counter("tgi_request_success", "Requests that succeeded")
        self.request_failure = Counter("tgi_request_failure", "Requests that failed", ("err",))
        self.request_duration = Histogram("tgi_request_duration", "End-to-end request duration (s)", d)
        self.validation_duration = Histogram("tgi_request_validation_duration", "Validation duration (s)", d)
        self.queue_duration = Histogram("tgi_request_queue_duration", "Time spent in the queue (s)", d)
        self.inference_duration = Histogram("tgi_request_inference_duration", "Inference duration (s)", d)
        self.time_per_token = Histogram(
            "tgi_request_mean_time_per_token_duration", "Mean time per generated token (s)", d
        )
        self.input_length = Histogram(
            "tgi_request_input_length", "Input length (tokens)", linear_buckets(max_input_tokens)
        )
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens", linear_buckets(max_total_tokens)
        )
        self.max_new_tokens = Histogram(
            "tgi_request_max_new_tokens", "Requested max_new_tokens", linear_buckets(max_total_tokens)
        )
        self.time_to_first_token = Histogram(
            "ember_time_to_first_token_seconds", "From arrival to the first generated token (s)", d
        )
        self.inter_token_latency = Histogram(
            "ember_inter_token_latency_seconds", "Between consecutive generated tokens of a request (s)", d
        )
        self.prompt_tokens = Counter(
            "ember_prompt_tokens_total",
            "Prompt tokens by where their keys and values came from: the prefix cache or computed",
            ("source",),
        )
        self.draft_tokens = Counter(
            "ember_speculative_draft_tokens", "Draft tokens verified by speculative decoding (--speculate)"
        )
        self.accepted_tokens = Counter(
            "ember_speculative_accepted_tokens", "Draft tokens the model accepted (each one a token gained)"
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting in the queue")
        self.batch_current_size = Gauge("tgi_batch_current_size", "Requests in the running batch")
        self.batch_current_max_tokens = Gauge("tgi_batch_current_max_tokens", "Tokens reserved by the running batch")
        self.batch_max_total_tokens = Gauge("tgi_batch_max_total_tokens", "Token budget of all batches")
        self.kv_cache_usage = Gauge(
            "ember_kv_cache_usage_ratio", "Share of the KV-cache token budget held by running requests (0 to 1)"
        )
        self.batch_peak_size = Gauge("ember_batch_peak_size", "Largest running batch seen since start")
        self.batch_next_size = Histogram(
            "tgi_batch_next_size", "Size of each new prefill batch", [float(2**i) for i in range(11)]
        )
        self.batch_concat = Counter("tgi_batch_concat", "Batches merged into the running one", ("reason",))
        self.batch_inference_count = Counter("tgi_batch_inference_count", "Shard calls", (m,))
        self.batch_inference_success = Counter("tgi_batch_inference_success", "Shard calls that succeeded", (m,))
        self.batch_inference_failure = Counter("tgi_batch_inference_failure", "Shard calls that failed", (m,))
        self.batch_inference_duration = Histogram("tgi_batch_inference_duration", "Shard call duration (s)", d, (m,))
        self.batch_forward_duration = Histogram(
            "tgi_batch_forward_duration", "Forward duration on the shard (s)", d, (m,)
        )
        self.batch_decode_duration = Histogram(
            "tgi_batch_decode_duration", "Detokenisation duration on the shard (s)", d, (m,)
        )
        self.batch_filter_duration = Histogram("tgi_batch_filter_duration", "FilterBatch duration (s)", d, (m,))
        self.batch_concat_duration = Histogram(
            "tgi_batch_concat_duration", "Batch concatenation duration on the shard (s)", d, (m,)
        )

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        return render(self.all())


class ServerMetrics:
    """The server's own series, one set whatever the models: HTTP answers by route and status, draining."""

    def __init__(self) -> None:
        self.http_requests = Counter(
            "ember_http_requests_total", "HTTP requests answered, by route template and status", ("route", "status")
        )
        self.draining = Gauge(
            "ember_draining", "1 from SIGTERM until exit: in-flight requests finish, new ones get 503"
        )
        self.draining.set(0)

    def all(self) -> list[_Metric]:
        return [self.http_requests, self.draining]

    def render(self) -> str:
        return render(self.all())


def _with_model(line: str, model: str) -> str:
    """A sample line with `model="..."` as its last label."""
    label = f'model="{model}"'
    name, _, rest = line.partition(" ")
    if name.endswith("}"):
        return f"{name[:-1]},{label}}} {rest}"
    return f"{name}{{{label}}} {rest}"


def without_model(text: str) -> str:
    """The exposition as a single-model server (and TGI) writes it: the `model` label left out."""
    return re.sub(r'\{model="[^"]*"\}|,model="[^"]*"', "", text)


def render_models(models) -> str:
    """Every loaded model's series under TGI's names with a `model` label, then the models' own series."""
    served = list(models.loaded.values())
    lines: list[str] = []
    if served:
        for i, metric in enumerate(served[0].metrics.all()):
            lines.extend(metric.header())
            for s in served:
                lines.extend(_with_model(line, s.name) for line in s.metrics.all()[i].render())
    for metric in models.metrics.all():
        lines.extend(metric.header())
        lines.extend(metric.render())
    return "\n".join(lines) + "\n"
