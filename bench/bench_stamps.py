"""What stamping the latency stages costs, against the step it stamps (target < 2%).

Example:
    .venv/bin/python bench/bench_stamps.py                   # the default model, random weights
    .venv/bin/python bench/bench_stamps.py BUNDLE --frames 2000   # e.g. a simulator bundle

Times, per frame and in one process, the code ``policy_node`` runs for the stamps and nothing
else: placing the steady marks on the clock (``latency.on_clock``), ``PolicyStamps`` and its
stage times into the diagnostics window, the four ``Time`` fields of ``~/output``, keeping the
step for the driver's ``~/applied``; and, per applied command, matching it to its step and
recording ``apply`` and end to end (``policy_node._on_applied``). The step it stamps:
``Policy.step`` on a 120x160 camera frame with the bundle's LiteRT model, or without a bundle
the default model (120x120x3, MaLPi convs, LSTM 128) with random weights (the smallest part of
the frame path: the callback also decodes and publishes), followed, untimed, by what the node
does between its step and its stamps (the Twist, the output's fields), so the stamps run with
the caches as the node leaves them. Both are timed frame by frame in turn,
so the load of the shared machine moves them alike. The serialized ``~/output`` grows by the
four stamps (32 bytes), printed too.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from geometry_msgs.msg import Twist
from machine import describe, load

from malpi_ros.config import PolicyConfig
from malpi_ros.msg import PolicyOutput
from malpi_ros.nodes.runner import set_time
from malpi_ros.runtime import latency
from malpi_ros.runtime.actions import twist_for
from malpi_ros.runtime.node_stats import NodeStats
from malpi_ros.runtime.policy import Policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('bundle', type=Path, nargs='?', help='default: the default model')
    parser.add_argument('--frames', type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = Policy.from_bundle(args.bundle) if args.bundle else default_policy(Path(tmp))
        measure(policy, args.bundle.name if args.bundle else 'the default model', args.frames)


def default_policy(directory: Path) -> Policy:
    """The default config's step model, random weights, on LiteRT (needs TensorFlow)."""
    import keras

    from malpi_ros.learn.export import export_litert
    from malpi_ros.learn.model import build_sequence_model, build_step_model
    from malpi_ros.runtime.litert import LiteRTStep

    config = PolicyConfig()
    keras.utils.set_random_seed(0)
    step_model = build_step_model(config.model, build_sequence_model(config.model))
    export_litert(step_model, directory / 'step.tflite')
    return Policy(LiteRTStep(directory / 'step.tflite'), config, dt=0.1)


def measure(policy: Policy, name: str, frames: int) -> None:
    from rclpy.clock import Clock
    from rclpy.serialization import serialize_message

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (120, 160, 3), np.uint8)
    for _ in range(20):
        policy.step(frame)
    clock = Clock()
    stats = NodeStats()
    recent: deque[latency.PolicyStamps] = deque(maxlen=16)
    out = PolicyOutput()
    lock = threading.Lock()  # policy_node's command lock
    step_ns: list[int] = []
    stamp_ns: list[int] = []
    match_ns: list[int] = []
    load_before = load()
    for _ in range(frames):
        # As policy_node does per frame: one clock reading (it read the clock before too), the
        # steady marks put on it, the stamps, the diagnostics window, the message fields.
        started = time.perf_counter_ns()
        now_ns = clock.now().nanoseconds
        x0 = time.perf_counter_ns()
        anchor = time.perf_counter_ns()  # added by the stamps
        x1 = time.perf_counter_ns()
        result = policy.step(frame)
        t1 = time.perf_counter_ns()
        # What the node does between the step and its stamps (untimed): the Twist, the output.
        twist = Twist()
        twist.linear.x, twist.angular.z = twist_for(result.action, policy.config.actions)
        out.probabilities = result.probabilities.tolist()
        out.action, out.action_name = result.action, result.action_name
        out.step, out.inference_ms = result.step, result.inference_ms
        y0 = time.perf_counter_ns()
        published = time.perf_counter_ns()  # added by the stamps
        received, preprocessed, model_done, sent = latency.on_clock(
            now_ns, anchor, (started, result.times.normalized_ns, result.times.end_ns, published)
        )
        stamps = latency.PolicyStamps(now_ns - 1_000_000, received, preprocessed, model_done, sent)
        set_time(out.received, received)
        set_time(out.preprocessed, preprocessed)
        set_time(out.stepped, model_done)
        set_time(out.published, sent)
        stats.stamped(stamps)
        with lock:
            recent.append(stamps)
        y1 = time.perf_counter_ns()
        # ... and per applied command (policy_node._on_applied, another callback).
        with lock:
            step = latency.owner(recent, sent)
            if step is not None:
                recent.remove(step)
        if step is not None:
            stats.stamped(step, sent + 1_000_000)
        z1 = time.perf_counter_ns()
        step_ns.append(t1 - x1)
        # Each bracket holds one perf_counter read of its own: the cost is slightly overstated.
        stamp_ns.append((x1 - x0) + (y1 - y0))
        match_ns.append(z1 - y1)
    step = np.median(step_ns) * 1e-3
    stamp = np.median(stamp_ns) * 1e-3
    bare = PolicyOutput()
    print(describe())
    print(f'load average {load_before:.2f} before, {load():.2f} after; {frames} frames')
    print(f'Policy.step (120x160 frame, {name}): median {step:.1f} us')
    matching = np.median(match_ns) * 1e-3
    print(
        f'stamping in the frame path: median {stamp:.1f} us, '
        f'p99 {np.percentile(stamp_ns, 99) * 1e-3:.1f} us; matching its applied command (the '
        f'~/applied callback): median {matching:.1f} us'
    )
    print(
        f'overhead: {stamp / step:.2%} of the step in the frame path, '
        f'{(stamp + matching) / step:.2%} with the matching (target < 2%)'
    )
    print(
        f'~/output serialized: {len(serialize_message(out))} bytes with the stamps set '
        f'(the fields are always there: {len(serialize_message(bare))} unset)'
    )


if __name__ == '__main__':
    main()
