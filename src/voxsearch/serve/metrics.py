"""Request counters and latency histograms of one ingress replica, in Prometheus text format."""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RequestMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.uploads_rejected: dict[int, int] = defaultdict(int)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            buckets = self.latency_buckets[route]
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self.latency_sum[route] += seconds
            self.latency_count[route] += 1

    def reject_upload(self, status: int) -> None:
        with self._lock:
            self.uploads_rejected[status] += 1

    def render(self, replica: str, gauges: dict[str, float]) -> str:
        lines = [
            "# HELP voxsearch_requests_total HTTP requests by route and status.",
            "# TYPE voxsearch_requests_total counter",
        ]
        with self._lock:
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(
                    f'voxsearch_requests_total{{replica="{replica}",method="{method}",route="{route}",status="{status}"}} {n}'
                )
            lines += [
                "# HELP voxsearch_request_seconds Request latency by route.",
                "# TYPE voxsearch_request_seconds histogram",
            ]
            for route, buckets in sorted(self.latency_buckets.items()):
                for bound, n in zip(BUCKETS, buckets):
                    lines.append(f'voxsearch_request_seconds_bucket{{replica="{replica}",route="{route}",le="{bound}"}} {n}')
                count = self.latency_count[route]
                lines.append(f'voxsearch_request_seconds_bucket{{replica="{replica}",route="{route}",le="+Inf"}} {count}')
                lines.append(f'voxsearch_request_seconds_sum{{replica="{replica}",route="{route}"}} {self.latency_sum[route]:.6f}')
                lines.append(f'voxsearch_request_seconds_count{{replica="{replica}",route="{route}"}} {count}')
            lines += [
                "# HELP voxsearch_uploads_rejected_total Uploads refused by validation, by HTTP status.",
                "# TYPE voxsearch_uploads_rejected_total counter",
            ]
            for status, n in sorted(self.uploads_rejected.items()):
                lines.append(f'voxsearch_uploads_rejected_total{{replica="{replica}",status="{status}"}} {n}')
        for name, value in sorted(gauges.items()):
            lines.append(f"# TYPE voxsearch_{name} gauge")
            lines.append(f'voxsearch_{name}{{replica="{replica}"}} {value}')
        return "\n".join(lines) + "\n"
