"""The numbers policy_node reports on /diagnostics: rates, inference time, frame age, counts.

Pure (no rclpy) so the arithmetic is tested with fake times. Counts are cumulative since start;
rates cover the interval since the previous report; inference time and frame age percentiles
cover the last ``window`` steps/frames. The level is WARN when frames were malformed or late
since the previous report (the camera or its clock needs looking at) and ERROR when a callback
failed; OK otherwise (DESIGN §5: a silent failure looks like a working robot).

Per-stage times of the frame path (``STAGES``, median over the window) say where a frame's
milliseconds go on the robot itself, not only in a benchmark; the latency stages from the stage
stamps (``runtime.latency``: frame stamp -> ... -> applied by the motor driver, and end to end)
are reported as p50/p99/max over the window, summarized as ``malpi-ros latency`` does.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from malpi_ros.runtime import latency

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels

# superseded: replaced while waiting for the stepping thread by a newer frame (policy_node).
COUNTERS = ('received', 'stepped', 'skipped', 'superseded', 'late', 'malformed', 'errors')
# Stages of the frame path in the node (ms), in order: handoff (the image callback to the
# stepping thread), decode the message, fit (crop + resize), normalize (into the model's input),
# model (the runtime call), command (the Twist built and published: it goes first), output (then
# the rest: counters, PolicyOutput built and published); callback: all of them, from the image
# callback's start to the output published.
STAGES = ('handoff', 'decode', 'fit', 'normalize', 'model', 'command', 'output', 'callback')
_PROBLEMS = (('malformed', 'malformed frames'), ('late', 'late frames'), ('errors', 'errors'))


@dataclass(frozen=True)
class Report:
    """One diagnostics report: level (OK/WARN/ERROR), a one-line summary, key/value strings."""

    level: int
    message: str
    values: tuple[tuple[str, str], ...]

    def value(self, key: str) -> str:
        return dict(self.values)[key]


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile of some timings; None when there are none (nothing measured)."""
    array = np.asarray(values if isinstance(values, np.ndarray) else list(values), np.float64)
    return float(np.percentile(array, q)) if array.size else None


def _pct(values: deque[float], q: float) -> float:
    value = percentile(values, q)
    return float('nan') if value is None else value  # NaN: printed as n/a


def _ms(value: float, digits: int = 2) -> str:
    return 'n/a' if value != value else f'{value:.{digits}f}'  # NaN: nothing measured yet


class NodeStats:
    """Counters and recent timings, updated from the image callback, read by a timer.

    Thread-safe: the callbacks run in different threads of a multi-threaded executor.
    """

    def __init__(self, window: int = 300) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f'window must be an integer >= 1, got {window!r}')
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._inference_ms: deque[float] = deque(maxlen=window)
        self._age_s: deque[float] = deque(maxlen=window)
        self._stages: dict[str, deque[float]] = {n: deque(maxlen=window) for n in STAGES}
        # Stamps, not stage times: the frame path only appends; the report does the arithmetic.
        self._stamped: deque[latency.PolicyStamps] = deque(maxlen=window)
        self._applied: deque[tuple[latency.PolicyStamps, int]] = deque(maxlen=window)
        self._last_age = float('nan')
        self._previous: dict[str, int] | None = None  # counts at the previous report
        self._previous_at: float | None = None

    def frame(self, age: float | None) -> None:
        """A frame arrived; ``age``: receive time minus its stamp (s), None when unknown."""
        with self._lock:
            self.counts['received'] += 1
            if age is not None:
                self._age_s.append(age)
                self._last_age = age

    def count(self, name: str) -> None:
        """One more of ``skipped``, ``late``, ``malformed`` or ``errors``."""
        with self._lock:
            self.counts[name] += 1

    def step(self, inference_ms: float) -> None:
        with self._lock:
            self.counts['stepped'] += 1
            self._inference_ms.append(inference_ms)

    def timed(self, **stages_ms: float) -> None:
        """The times (ms) of one frame's stages, by name (``STAGES``)."""
        unknown = set(stages_ms) - set(STAGES)
        if unknown:
            raise ValueError(f'unknown stages {sorted(unknown)}; known: {", ".join(STAGES)}')
        with self._lock:
            for name, ms in stages_ms.items():
                self._stages[name].append(ms)

    def stamped(self, stamps: latency.PolicyStamps, applied_ns: int | None = None) -> None:
        """A step's stamps; with ``applied_ns``: a step the motor driver applied, and when."""
        with self._lock:
            if applied_ns is None:
                self._stamped.append(stamps)
            else:
                self._applied.append((stamps, applied_ns))

    def report(self, now: float, extra: tuple[tuple[str, str], ...] = ()) -> Report:
        """The report for the interval since the previous call (``now``: monotonic seconds)."""
        with self._lock:
            counts = dict(self.counts)
            previous = self._previous or dict.fromkeys(COUNTERS, 0)
            elapsed = now - self._previous_at if self._previous_at is not None else 0.0
            self._previous, self._previous_at = counts, now
            inference = (
                _pct(self._inference_ms, 50),
                _pct(self._inference_ms, 99),
            )
            age_last, age_p99 = self._last_age, _pct(self._age_s, 99)
            age_p50 = _pct(self._age_s, 50)
            stages = {name: _pct(times, 50) for name, times in self._stages.items()}
            callback_p99 = _pct(self._stages['callback'], 99)
            stamped, applied = list(self._stamped), list(self._applied)
        summaries = latency.summaries(stamped, applied)
        grew = {name: counts[name] - previous[name] for name in COUNTERS}

        def rate(name: str) -> str:
            return f'{grew[name] / elapsed:.1f}' if elapsed > 0 else 'n/a'

        problems = [f'{grew[n]} {what}' for n, what in _PROBLEMS if grew[n]]
        if grew['errors']:
            level = ERROR
        elif grew['malformed'] or grew['late']:
            level = WARN
        else:
            level = OK
        if problems:
            message = f'{", ".join(problems)} since the last report'
        elif not grew['received']:
            message = 'no frames since the last report'
        else:
            message = 'ok'
        values = (
            ('input_rate_hz', rate('received')),
            ('steps_per_s', rate('stepped')),
            ('inference_ms_p50', _ms(inference[0])),
            ('inference_ms_p99', _ms(inference[1])),
            ('frame_age_ms_last', _ms(age_last * 1e3)),
            ('frame_age_ms_p50', _ms(age_p50 * 1e3)),
            ('frame_age_ms_p99', _ms(age_p99 * 1e3)),
            # Microseconds shown: decode and fit of a small frame take tens of them.
            *((f'{name}_ms_p50', _ms(ms, 3)) for name, ms in stages.items()),
            ('callback_ms_p99', _ms(callback_p99, 3)),
            *(
                (f'latency_{s.name}_ms_{q}', _ms(value, 3))
                for s in summaries
                for q, value in (('p50', s.p50), ('p99', s.p99), ('max', s.max))
            ),
            *((name, str(counts[name])) for name in COUNTERS),
            *extra,
        )
        return Report(level, message, values)
