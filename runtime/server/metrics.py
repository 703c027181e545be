"""Metrics: counters and histograms rendered with live gauges as Prometheus text, no dependency."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

__all__ = ["Metrics", "rss_bytes"]


# ==============================================================================================
# Metrics: Prometheus text format, no dependency
# ==============================================================================================
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TILE_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5)
_RATES = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 500, 1000)
_TILES = (1, 2, 3, 4, 5, 7, 9, 10, 13, 17, 21, 26, 37, 50)  # 1 unsplit; rows·cols + 1 split (4×4 + 1 = 17)

# name → (type, help, histogram buckets; none for a counter)
_METRICS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "rksmolvlm_requests_total": ("counter", "HTTP requests answered, by path and status.", ()),
    "rksmolvlm_errors_total": ("counter", "Error responses, by error code.", ()),
    "rksmolvlm_aborted_generations_total": ("counter", "Generations stopped before their end, by reason "
                                            "(client_disconnect, timeout, shutdown).", ()),
    "rksmolvlm_dropped_queued_total": ("counter", "Requests that left the queue before running, by reason.", ()),
    "rksmolvlm_prompt_tokens_total": ("counter", "Prompt tokens processed.", ()),
    "rksmolvlm_completion_tokens_total": ("counter", "Tokens generated.", ()),
    "rksmolvlm_vision_tiles_total": ("counter", "Image tiles encoded by the vision tower.", ()),
    "rksmolvlm_vision_seconds_total": ("counter", "Seconds spent in the vision tower.", ()),
    "rksmolvlm_video_frames_total": ("counter", "Video frames in prompts, by source (decoded, cache).", ()),
    "rksmolvlm_video_decode_seconds_total": ("counter", "Seconds spent decoding and resizing video frames.", ()),
    "rksmolvlm_queue_wait_seconds": ("histogram", "Seconds a request waited in the queue.", _SECONDS),
    "rksmolvlm_time_to_first_token_seconds": ("histogram", "Seconds from arrival to the first token.", _SECONDS),
    "rksmolvlm_decode_tokens_per_second": ("histogram", "Decode speed of each request (tokens/s).", _RATES),
    "rksmolvlm_image_tiles": ("histogram", "Tower passes each prompt image was tiled into (the chosen resolution: "
                              "split tiles + the global one, or 1 unsplit), encoded or from the cache.", _TILES),
    "rksmolvlm_vision_seconds_per_tile": ("histogram", "Vision tower seconds per tile, per request.", _TILE_SECONDS),
    "rksmolvlm_generation_seconds": ("histogram", "Seconds a request held the model.", _SECONDS),
}


_UNLABELED = ("rksmolvlm_prompt_tokens_total", "rksmolvlm_completion_tokens_total", "rksmolvlm_vision_tiles_total",
              "rksmolvlm_vision_seconds_total")


class Metrics:
    """Counters and histograms (thread-safe), rendered with the live gauges as Prometheus text."""

    def __init__(self):
        self._lock = threading.Lock()
        # name → (sorted label pairs → value)
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {
            name: {} for name, (kind, _, _) in _METRICS.items() if kind == "counter"}
        for name in _UNLABELED:  # series that exist from the start, so rate() works from the first scrape
            self._counters[name][()] = 0
        for reason in ("client_disconnect", "timeout", "shutdown"):
            self._counters["rksmolvlm_aborted_generations_total"][(("reason", reason),)] = 0
        self._histograms: dict[str, _Histogram] = {name: _Histogram([0] * (len(buckets) + 1))
                                                   for name, (kind, _, buckets) in _METRICS.items()
                                                   if kind == "histogram"}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0) + amount

    def observe(self, name: str, value: float) -> None:
        buckets = _METRICS[name][2]
        with self._lock:
            histogram = self._histograms[name]
            for i, bound in enumerate(buckets):
                if value <= bound:
                    histogram.counts[i] += 1
                    break
            else:
                histogram.counts[-1] += 1
            histogram.total += value
            histogram.count += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (0 when never incremented)."""
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0)

    def render(self, gauges: dict[str, tuple[str, list[tuple[dict[str, str], float]]]]) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text, buckets) in _METRICS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    counted = self._counters[name]
                    lines += [f"{name}{_labels(dict(key))} {_num(v)}" for key, v in sorted(counted.items())]
                else:
                    histogram = self._histograms[name]
                    running = 0
                    for bound, n in zip((*buckets, "+Inf"), histogram.counts):
                        running += n
                        lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
                    lines += [f"{name}_sum {_num(histogram.total)}", f"{name}_count {histogram.count}"]
        for name, (help_text, series) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines += [f"{name}{_labels(labels)} {_num(v)}" for labels, v in series]
        return "\n".join(lines) + "\n"


def rss_bytes() -> int:
    """The resident memory of this process (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class _Histogram:
    """One histogram's state: a count per bucket (the last is +Inf), the sum and count of the values."""
    counts: list[int]
    total: float = 0.0
    count: int = 0


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
