"""The server's Prometheus metrics (prometheus-client, one registry per app) and its drift signals: the
rolling mean confidence of its predictions and the share of feedback that disagrees with them."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROLLING = 500  # predictions (and feedback rows) the drift signals average over


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("slimtune_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("slimtune_request_seconds", "request latency by route", ["route"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("slimtune_batch_size", "texts per model call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_depth = Gauge("slimtune_queue_depth", "texts waiting for the model", registry=r)
        self.confidence = Histogram("slimtune_prediction_confidence", "probability of the predicted label",
                                    registry=r, buckets=(.5, .6, .7, .8, .9, .95, .99, 1.0))
        self.rolling_confidence = Gauge("slimtune_rolling_confidence",
                                        f"mean confidence of the last {ROLLING} predictions", registry=r)
        self.disagreement = Gauge("slimtune_feedback_disagreement",
                                  f"share of the last {ROLLING} feedback rows whose label differs from the "
                                  "prediction", registry=r)
        self.feedback = Counter("slimtune_feedback", "feedback rows stored", registry=r)
        self.reloads = Counter("slimtune_reloads", "model switches by result", ["result"], registry=r)
        self.model = Gauge("slimtune_model_info", "the model being served (value 1)", ["version", "runtime"],
                           registry=r)
        self.recent: deque[float] = deque(maxlen=ROLLING)

    def predicted(self, results: list[dict]) -> None:
        for result in results:
            self.confidence.observe(result["score"])
            self.recent.append(result["score"])
        self.rolling_confidence.set(self.rolling_mean() or 0.0)

    def rolling_mean(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def serving(self, version: str, runtime: str) -> None:
        self.model.clear()
        self.model.labels(version=version, runtime=runtime).set(1)
