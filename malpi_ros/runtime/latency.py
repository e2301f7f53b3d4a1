"""Where the milliseconds go between the camera and the motors: stage stamps and their report.

Each stage stamps its part on one clock (the ROS clock of the nodes; on one machine that is the
camera's and the DDS source timestamps' clock too):

- ``frame``: the camera frame's header stamp;
- ``received``: ``policy_node``'s image callback began with it;
- ``preprocessed``: decoded, fitted (crop + resize) and normalized into the model's input;
- ``stepped``: the model step done (probabilities and the new state out);
- ``published``: the Twist published on ``cmd_vel`` (0 when none was: disabled);
- ``applied``: ``motor_driver_node`` gave the command's throttles to the motors.

The first five travel on ``policy_node``'s ``~/output`` (``PolicyOutput``), the last on the
driver's ``~/applied`` (``AppliedCommand``), with ``command``: the publish stamp of the Twist it
applied (its DDS source timestamp). A Twist has no header, so an applied command is related to
its frame by that stamp: it belongs to the output whose step ended at or before it and whose
publish returned at or after it (``match``). Pure and tested with known stamps; the node keeps
the same numbers live for ``/diagnostics`` (``node_stats``), ``malpi-ros latency`` reads them
from a recording.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# A stage: (name, from stamp, to stamp). Contiguous, so per frame they add up to end to end.
STAGES = (
    ('receive', 'frame', 'received'),  # camera, DDS, the executor's hand-off
    ('preprocess', 'received', 'preprocessed'),  # frame checks, decode, fit, normalize
    ('model', 'preprocessed', 'stepped'),  # the runtime call
    ('command', 'stepped', 'published'),  # action -> Twist -> cmd_vel published
    ('apply', 'published', 'applied'),  # DDS, the driver's callback, mixing, the motors
)
STAGE_NAMES = tuple(name for name, _, _ in STAGES)
END_TO_END = 'end_to_end'  # frame stamp -> applied
NAMES = (*STAGE_NAMES, END_TO_END)
# ns: how far an applied command's publish stamp may lie after the output's ``published``
# stamp and still be its (the node derives that stamp from one clock reading per frame: a few
# microseconds of skew; the next frame's step is milliseconds away).
MATCH_SLACK_NS = 500_000
PERCENTILES = (50.0, 99.0)


class PolicyStamps(NamedTuple):
    """One step's stamps (ns on the node's clock); ``published`` 0: no cmd_vel was sent.

    A named tuple, not a checked dataclass: the node makes one per frame (half the cost) from
    steady marks that cannot run backwards; stamps read from elsewhere go through ``check``.
    """

    frame: int
    received: int
    preprocessed: int
    stepped: int
    published: int

    def check(self) -> PolicyStamps:
        """Itself, if its stages are in order; ValueError saying what was received."""
        if not self.received <= self.preprocessed <= self.stepped:
            raise ValueError(f'policy stage stamps must not decrease, got {self}')
        if self.published and self.published < self.stepped:
            raise ValueError(f'published before stepped: {self}')
        return self

    def durations(self, applied: int | None = None) -> dict[str, float]:
        """Stage times (ms) of this step; ``apply`` and end to end only with ``applied``."""
        stamps = {
            'frame': self.frame,
            'received': self.received,
            'preprocessed': self.preprocessed,
            'stepped': self.stepped,
            'published': self.published or None,
            'applied': applied,
        }
        out = {}
        for name, start, end in STAGES:
            begin, finish = stamps[start], stamps[end]
            if begin is not None and finish is not None:
                out[name] = (finish - begin) * 1e-6
        if applied is not None and self.published:
            out[END_TO_END] = (applied - self.frame) * 1e-6
        return out


def stamp_ns(stamp: Any) -> int:
    """A ``builtin_interfaces/Time`` (rclpy's or rosbags') in ns."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def on_clock(clock_ns: int, steady_ns: int, marks: Sequence[int]) -> tuple[int, ...]:
    """Clock stamps (ns) of ``time.perf_counter_ns`` marks, from one reading of both clocks
    (``clock_ns`` read at steady ``steady_ns``): the stages are timed on the steady clock, as
    ``StepTimes`` is, and placed on the clock with one clock call per frame. A mark 0 stays 0."""
    offset = clock_ns - steady_ns
    return tuple([m + offset if m else 0 for m in marks])


@dataclass(frozen=True)
class Applied:
    """One command the driver applied: ``command`` its publish stamp, ``applied`` when the
    motors got it (ns)."""

    command: int
    applied: int


def owner(by_step: Sequence[PolicyStamps], command: int) -> PolicyStamps | None:
    """The step that published the command stamped ``command``, or None: the last of
    ``by_step`` (published steps in step order) whose step ended at or before the stamp, if its
    publish returned at or after it (within ``MATCH_SLACK_NS``)."""
    i = bisect.bisect_right(by_step, command, key=_step_end) - 1
    if i >= 0 and command <= by_step[i].published + MATCH_SLACK_NS:
        return by_step[i]
    return None


def _step_end(stamps: PolicyStamps) -> int:
    return stamps.stepped


def match(
    outputs: Sequence[PolicyStamps], applied: Iterable[Applied]
) -> list[tuple[PolicyStamps, int]]:
    """(output, applied stamp) for every applied command that one of ``outputs`` published
    (``owner``); commands of no output (a zero Twist of a stop, another publisher) are left
    out. A command reported more than once (the driver repeats ``~/applied`` at its rate)
    counts once, when it was first applied.
    """
    ordered = sorted((o for o in outputs if o.published), key=_step_end)
    first: dict[int, int] = {}
    for a in applied:
        if a.command and (a.command not in first or a.applied < first[a.command]):
            first[a.command] = a.applied
    pairs = []
    for command, applied_ns in sorted(first.items()):
        found = owner(ordered, command)
        if found is not None:
            pairs.append((found, applied_ns))
    return pairs


@dataclass(frozen=True)
class Summary:
    """p50/p99/max and mean (ms) of one stage over ``count`` frames (NaN when none)."""

    name: str
    count: int
    p50: float
    p99: float
    max: float
    mean: float


def summarize(name: str, values_ms: Iterable[float]) -> Summary:
    """The one p50/p99/max of stage times: the report and ``/diagnostics`` both use it."""
    array = np.fromiter(values_ms, np.float64)
    if not array.size:
        nan = float('nan')
        return Summary(name, 0, nan, nan, nan, nan)
    p50, p99 = (float(v) for v in np.percentile(array, PERCENTILES))
    return Summary(name, int(array.size), p50, p99, float(array.max()), float(array.mean()))


def collect(rows: Iterable[Mapping[str, float]]) -> dict[str, list[float]]:
    """Per-stage lists of the stage times of many frames (``PolicyStamps.durations``)."""
    out: dict[str, list[float]] = {name: [] for name in NAMES}
    for row in rows:
        for name, ms in row.items():
            out[name].append(ms)
    return out


@dataclass(frozen=True)
class LatencyReport:
    """The stages and end to end of a run, and how much of the end-to-end median they explain.

    ``share``: the sum of the stages' medians over the end-to-end median. The stages are
    contiguous (each frame's add up to its end to end exactly), so what a share below 1 misses
    is not an unstamped gap but what medians of skewed parts do not add up to; means do add up
    (``share_of_mean``, 1 but for the few outputs never seen applied).
    """

    stages: tuple[Summary, ...]
    end_to_end: Summary
    outputs: int  # ~/output messages with stamps
    published: int  # of them, with a command on cmd_vel
    matched: int  # commands found applied by the driver

    @property
    def share(self) -> float:
        total = sum(s.p50 for s in self.stages)
        return total / self.end_to_end.p50 if self.end_to_end.count else float('nan')

    @property
    def share_of_mean(self) -> float:
        total = sum(s.mean for s in self.stages)
        return total / self.end_to_end.mean if self.end_to_end.count else float('nan')

    def format(self) -> str:
        cols = ('frames', 'p50 ms', 'p99 ms', 'max ms', 'mean ms')
        lines = [f'{"stage":<34} ' + ' '.join(f'{c:>8}' for c in cols)]
        for s in (*self.stages, self.end_to_end):
            numbers = ' '.join(f'{v:>8.3f}' for v in (s.p50, s.p99, s.max, s.mean))
            lines.append(f'{DESCRIPTIONS[s.name]:<34} {s.count:>8} {numbers}')
        lines.append(
            f'stage medians add up to {self.share:.1%} of the end-to-end median, stage means '
            f'to {self.share_of_mean:.1%} of its mean ({self.matched} of {self.published} '
            f'commands matched to an applied one; {self.outputs} outputs)'
        )
        return '\n'.join(lines)


DESCRIPTIONS = {
    'receive': 'frame stamp -> received',
    'preprocess': 'received -> decoded+preprocessed',
    'model': 'preprocessed -> model step done',
    'command': 'step done -> cmd_vel published',
    'apply': 'cmd_vel published -> applied',
    END_TO_END: 'end to end: frame stamp -> applied',
}


def applying(stamps: PolicyStamps, applied: int) -> dict[str, float]:
    """The stages that need the driver's stamp (``apply``, end to end) of a matched step."""
    times = stamps.durations(applied)
    return {name: times[name] for name in ('apply', END_TO_END)}


def summaries(
    steps: Iterable[PolicyStamps], applied: Iterable[tuple[PolicyStamps, int]]
) -> tuple[Summary, ...]:
    """p50/p99/max of every stage (``NAMES``): the policy's stages over ``steps``, the applying
    one and end to end over the steps seen applied (step, applied stamp)."""
    rows = [s.durations() for s in steps]
    rows += [applying(s, a) for s, a in applied]
    return tuple(summarize(name, times) for name, times in collect(rows).items())


def report(outputs: Sequence[PolicyStamps], applied: Iterable[Applied]) -> LatencyReport:
    """Per-stage and end-to-end summaries of a recorded run (``summaries`` of its outputs and
    of the commands matched to an applied one)."""
    pairs = match(outputs, applied)
    *stages, end_to_end = summaries(outputs, pairs)
    return LatencyReport(
        stages=tuple(stages),
        end_to_end=end_to_end,
        outputs=len(outputs),
        published=sum(1 for o in outputs if o.published),
        matched=len(pairs),
    )
