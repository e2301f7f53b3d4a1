"""End-to-end latency of policy_node: a camera frame published -> its Twist, across processes.

Example:
    .venv/bin/python bench/bench_node_latency.py                  # 30 s per backend, 30 Hz
    .venv/bin/python bench/bench_node_latency.py --duration 10 --backends litert

This process plays the camera and the motor driver: it publishes 120x160 rgb8 frames at
``--rate`` (sensor-data QoS; stamped with their scheduled time on the wall clock, as a camera
stamps its exposures at a steady cadence however late a frame is handed over) and receives
``cmd_vel`` and ``~/output`` from the installed ``policy_node``, run in its own process once per
backend, on a bundle at the default config (120x120, MaLPi convs, LSTM 128) with random
weights, trained period ``--dt`` (default 1/30 s, so every frame is stepped); ``--precision
int8`` steps the bundle's int8 step model (added to the built bundle, full-integer, calibrated
on random frames). The k-th Twist belongs to the k-th output (both reliable, published in that
order per step); the output's stamp names the frame.

Reported per backend, over the measured window (after a warm-up): latency publish -> Twist
(median, p99, max), Twists / frames sent, the node's own counts (received, skipped,
superseded, late), its CPU (% of one core, and ms of CPU per frame received) and peak RSS
(VmHWM, start-up included), the ~/reset service round trip while stepping, and two checks of
"no frame older than the newest processed": output stamps strictly increasing, and how many
outputs arrived after the next frame had been sent (the node was still on an older frame when
a newer one existed). Then the stages of the frame path as the node itself timed them (its
/diagnostics, medians over its last 300 frames): frame age when the callback ran (transport +
executor), the hand-off to the stepping thread, decode, fit (crop + resize), normalize, model,
the command (Twist built and published, first), the rest (counters and PolicyOutput), all of
it. Targets (litert): median <= 3 ms, p99 <= 10 ms, a Twist for every frame sent, ~/reset p90
<= 5 ms, peak RSS <= 300 MB. The CPU (cores, AVX-512 or not) and the load are printed with the
figures: on a shared machine the tails follow the load, and CPU per frame is the steadier
figure to compare.

Runs with its own ROS_DOMAIN_ID and localhost-only discovery (DESIGN §6).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Before rclpy is imported: discovery stays on this machine, on a domain of our own.
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ.setdefault('ROS_DOMAIN_ID', str(80 + os.getpid() % 20))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np
import psutil
from machine import describe

from malpi_ros.runtime.litert import auto_threads

VENV = Path(sys.prefix)
NODE = VENV / 'lib' / 'malpi_ros' / 'policy_node'
HEIGHT, WIDTH = 120, 160

BUILD_BUNDLE = """
import sys
import keras
from malpi_ros.learn.export import save_bundle
from malpi_ros.config import PolicyConfig
from malpi_ros.learn.model import build_sequence_model
keras.utils.set_random_seed(0)
config = PolicyConfig()
save_bundle(sys.argv[1], build_sequence_model(config.model), config, dt=float(sys.argv[2]),
            seq_len=10, metrics={'note': 'random weights (bench/bench_node_latency.py)'})
"""

# --precision int8: the bundle's int8 step model, full-integer, calibrated as bench_int8.py does
# (random frames and the states the fp32 model reaches on them; speed does not depend on them).
ADD_INT8 = """
import sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[2])  # bench/
from bench_int8 import random_calibration
from malpi_ros.learn.model import build_step_model, load_sequence_model
from malpi_ros.learn.quantize import quantize
from malpi_ros.runtime.bundle import INT8_FILE, KERAS_FILE, add_model_file, load_bundle
bundle = load_bundle(sys.argv[1])
cfg = bundle.config.model
samples = random_calibration(bundle.tflite_path, 100)
step = build_step_model(cfg, load_sequence_model(bundle.keras_path, cfg))
with tempfile.TemporaryDirectory() as tmp:
    quantize(step, Path(tmp) / INT8_FILE, 'full_integer', samples)
    add_model_file(sys.argv[1], Path(tmp) / INT8_FILE, INT8_FILE, quantization='full_integer',
                   quantized_from=bundle.metadata['files'][KERAS_FILE]['sha256'],
                   representative={'from': 'random frames (bench/bench_node_latency.py)'})
"""


@dataclass
class Record:
    """What the bench process saw of one node run (times: time.monotonic)."""

    sent: dict[tuple[int, int], float] = field(default_factory=dict)
    sent_order: list[tuple[int, int]] = field(default_factory=list)
    twists: list[float] = field(default_factory=list)
    outputs: list[tuple[tuple[int, int], float, float]] = field(default_factory=list)
    diagnostics: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


# The node's own per-stage medians on /diagnostics (node_stats.STAGES), in path order.
STAGE_KEYS = (
    ('frame_age_ms_p50', 'frame age when the callback ran (+ transport + executor)'),
    ('handoff_ms_p50', 'handoff: image callback -> stepping thread'),
    ('decode_ms_p50', 'decode'),
    ('fit_ms_p50', 'fit (crop + resize)'),
    ('normalize_ms_p50', 'normalize'),
    ('model_ms_p50', 'model (LiteRT / Keras step)'),
    ('command_ms_p50', 'command: Twist built + published (first)'),
    ('output_ms_p50', 'then counters + PolicyOutput built + published'),
    ('callback_ms_p50', 'all of it: image callback start -> ~/output published'),
    ('callback_ms_p99', 'all of it, p99'),
)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float('nan')


def node_usage(proc: psutil.Process) -> tuple[float, int]:
    """CPU seconds (user + system) and peak RSS (bytes) of the node and its children."""
    cpu, peak = 0.0, 0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        cpu += times.user + times.system
        with open(f'/proc/{p.pid}/status') as status:  # VmHWM: the peak resident set
            for line in status:
                if line.startswith('VmHWM:'):
                    peak = max(peak, int(line.split()[1]) * 1024)
    return cpu, peak


def run_backend(backend: str, bundle: Path, args: argparse.Namespace, log: Path) -> dict:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import Twist
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import Image
    from std_srvs.srv import Trigger

    from malpi_ros.msg import PolicyOutput

    env = dict(os.environ, PATH=f'{VENV / "bin"}{os.pathsep}{os.environ.get("PATH", "")}')
    cmd = [str(NODE), '--ros-args', '-p', f'bundle:={bundle}', '-p', f'backend:={backend}']
    # stop_after long: a zero Twist for silence (e.g. a stall of the node) would be an extra
    # Twist without an output and break the k-th Twist <-> k-th output pairing.
    cmd += ['-p', f'num_threads:={args.threads}', '-p', 'stop_after:=30.0']
    if backend == 'litert':
        cmd += ['-p', f'precision:={args.precision}']
    out = log.open('w')
    node_proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    context = Context()
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node('bench_node_latency', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    rec = Record()

    def on_twist(_msg: Twist) -> None:
        with rec.lock:
            rec.twists.append(time.monotonic())

    def on_output(msg: PolicyOutput) -> None:
        key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        with rec.lock:
            rec.outputs.append((key, time.monotonic(), msg.inference_ms))

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith('policy_node'):
                with rec.lock:
                    rec.diagnostics.append({kv.key: kv.value for kv in status.values})

    node.create_subscription(Twist, 'cmd_vel', on_twist, 10)
    node.create_subscription(PolicyOutput, '/policy_node/output', on_output, 10)
    node.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)
    camera_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
    pub = node.create_publisher(Image, 'image', camera_qos)
    reset = node.create_client(Trigger, '/policy_node/reset')
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8).tobytes() for _ in range(8)]
    try:
        deadline = time.monotonic() + 60
        while pub.get_subscription_count() < 1:
            if node_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f'policy_node did not come up:\n{log.read_text()}')
            time.sleep(0.05)
        period = 1.0 / args.rate
        total = int((args.warmup + args.duration) * args.rate)
        start, wall_start = time.monotonic(), time.time_ns()
        window_start = start + args.warmup
        usage_start = None
        service_ms: list[float] = []
        lateness_ms: list[float] = []  # this process publishing after a frame's schedule
        next_call = window_start
        pending = None  # the ~/reset call in flight
        for i in range(total):
            due = start + i * period
            while (now := time.monotonic()) < due:
                time.sleep(min(0.002, due - now))
            if usage_start is None and now >= window_start:
                usage_start = (node_usage(psutil.Process(node_proc.pid)), now)
                with rec.lock:
                    diag_start = rec.diagnostics[-1] if rec.diagnostics else None
            msg = Image(height=HEIGHT, width=WIDTH, encoding='rgb8', step=WIDTH * 3)
            msg.data = frames[i % len(frames)]
            stamp = wall_start + round(i * period * 1e9)  # when the camera "exposed" it
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            msg.header.frame_id = 'camera'
            key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
            sent_at = time.monotonic()
            pub.publish(msg)
            rec.sent[key] = sent_at
            rec.sent_order.append(key)
            if sent_at >= window_start:
                lateness_ms.append((sent_at - due) * 1e3)
            # ~/reset round trip while the node steps (every 0.5 s in the window), timed when
            # the response arrives (the done callback runs in the spin thread)
            if args.service_calls and now >= next_call and (pending is None or pending.done()):
                asked = time.monotonic()
                pending = reset.call_async(Trigger.Request())
                pending.add_done_callback(
                    lambda _f, t0=asked: service_ms.append((time.monotonic() - t0) * 1e3)
                )
                next_call = now + 0.5
        end = time.monotonic()
        cpu_end, peak = node_usage(psutil.Process(node_proc.pid))
        time.sleep(1.5)  # outputs in flight, and one more diagnostics report
        with rec.lock:  # before the node stops: its final zero Twist has no output
            diag_end = rec.diagnostics[-1] if rec.diagnostics else None
            twists, outputs = list(rec.twists), list(rec.outputs)
    finally:
        node_proc.send_signal(2)  # SIGINT: the node's clean shutdown
        try:
            node_proc.wait(15)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        out.close()
        executor.shutdown(timeout_sec=5)
        spinner.join(timeout=5)
        node.destroy_node()
        rclpy.try_shutdown(context=context)

    (cpu_start, _), wall_start = usage_start
    pairs = list(zip(outputs, twists, strict=False))  # k-th Twist <-> k-th output
    window = [(o, t) for o, t in pairs if rec.sent.get(o[0], 0.0) >= window_start]
    latencies = [(t - rec.sent[o[0]]) * 1e3 for o, t in window]
    output_latencies = [(o[1] - rec.sent[o[0]]) * 1e3 for o, _ in window]
    sent_window = [k for k in rec.sent_order if rec.sent[k] >= window_start]
    index = {k: i for i, k in enumerate(rec.sent_order)}
    keys = [o[0] for o in outputs]
    out_of_order = sum(1 for a, b in itertools.pairwise(keys) if b <= a)
    overtaken = 0
    for o, _ in window:
        i = index[o[0]]
        if i + 1 < len(rec.sent_order) and rec.sent[rec.sent_order[i + 1]] < o[1]:
            overtaken += 1

    def delta(name: str) -> str:
        if diag_start is None or diag_end is None or name not in diag_end:
            return 'n/a'  # (a node of an older commit may not count it)
        return str(int(diag_end[name]) - int(diag_start[name]))

    stage_values = {k: diag_end.get(k, 'n/a') for k, _ in STAGE_KEYS} if diag_end else {}
    received = delta('received')
    got = int(received) if received != 'n/a' else len(sent_window)
    return {
        'backend': backend,
        'stages': stage_values,
        'sent': len(sent_window),
        'twists': len(window),
        'median_ms': statistics.median(latencies) if latencies else float('nan'),
        'p99_ms': percentile(latencies, 99),
        'max_ms': max(latencies, default=float('nan')),
        'output_median_ms': statistics.median(output_latencies) if latencies else float('nan'),
        'inference_median_ms': statistics.median([o[2] for o, _ in window]) if window else 0,
        'received': received,
        'skipped': delta('skipped'),
        'superseded': delta('superseded'),
        'late': delta('late'),
        'cpu_percent': (cpu_end - cpu_start) / (end - wall_start) * 100,
        # Per frame the node got (the load moves this far less than the latencies).
        'cpu_ms_per_frame': (cpu_end - cpu_start) * 1e3 / max(1, got),
        'peak_rss_mb': peak / 1e6,
        'service_median_ms': statistics.median(service_ms) if service_ms else float('nan'),
        'service_p90_ms': percentile(service_ms, 90),
        'service_max_ms': max(service_ms, default=float('nan')),
        'out_of_order': out_of_order,
        'overtaken': overtaken,
        'lateness_median_ms': statistics.median(lateness_ms) if lateness_ms else float('nan'),
        'twists_total': len(twists),
        'outputs_total': len(outputs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--duration', type=float, default=30.0, help='measured seconds/backend')
    parser.add_argument('--warmup', type=float, default=3.0, help='seconds before measuring')
    parser.add_argument('--rate', type=float, default=30.0, help='frames per second sent')
    parser.add_argument('--dt', type=float, default=1 / 30, help="the bundle's trained period")
    parser.add_argument(
        '--threads', type=int, default=0, help='LiteRT threads in the node (0 = auto)'
    )
    parser.add_argument('--backends', nargs='+', default=['litert', 'keras'])
    parser.add_argument(
        '--bundle',
        type=Path,
        help='step this bundle (dt must match --dt) instead of building one: alternate runs '
        'without paying TensorFlow each time',
    )
    parser.add_argument(
        '--no-service-calls', dest='service_calls', action='store_false', help='skip ~/reset'
    )
    parser.add_argument(
        '--precision',
        choices=('fp32', 'int8'),
        default='fp32',
        help="the node's LiteRT step model (int8: added to the built bundle, full-integer)",
    )
    args = parser.parse_args(argv)
    if not NODE.is_file():
        print(f'{NODE} not installed: run make build first', file=sys.stderr)
        return 2

    load = os.getloadavg()  # other processes' CPU use changes the tail latencies a lot
    with tempfile.TemporaryDirectory(prefix='bench_node_latency_') as tmp:
        bundle = args.bundle or Path(tmp) / 'bundle'
        if args.bundle is None:
            subprocess.run(
                [sys.executable, '-c', BUILD_BUNDLE, str(bundle), str(args.dt)],
                check=True,
                capture_output=True,
            )
            if args.precision == 'int8':
                subprocess.run(
                    [sys.executable, '-c', ADD_INT8, str(bundle), str(Path(__file__).parent)],
                    check=True,
                    capture_output=True,
                )
        results = []
        for backend in args.backends:
            log = Path(tmp) / f'{backend}.log'
            try:
                results.append(run_backend(backend, bundle, args, log))
            except Exception:
                print(log.read_text() if log.exists() else '(no log)', file=sys.stderr)
                raise

    print(
        f'policy_node end to end: {HEIGHT}x{WIDTH} rgb8 at {args.rate:g} Hz for '
        f'{args.duration:g} s per backend (after {args.warmup:g} s warm-up); bundle 120x120, '
        f'LSTM 128, random weights, dt {args.dt:.4f} s, LiteRT {args.precision}, threads '
        f'{args.threads or f"auto = {auto_threads()}"}; '
        f'load average {load[0]:.2f} before / {os.getloadavg()[0]:.2f} after; '
        f'ROS_DOMAIN_ID {os.environ["ROS_DOMAIN_ID"]}\nmachine: {describe()}'
    )
    for r in results:
        if r['twists_total'] != r['outputs_total']:
            print(
                f'WARNING {r["backend"]}: {r["twists_total"]} Twists but {r["outputs_total"]} '
                'outputs: the Twist latencies are mispaired'
            )
    print()
    print('| measure | ' + ' | '.join(r['backend'] for r in results) + ' | target (litert) |')
    print('|---|' + '---:|' * len(results) + '---|')
    rows = [
        ('latency frame -> Twist, median (ms)', 'median_ms', '{:.2f}', '<= 3'),
        ('latency frame -> Twist, p99 (ms)', 'p99_ms', '{:.2f}', '<= 10'),
        ('latency frame -> Twist, max (ms)', 'max_ms', '{:.2f}', ''),
        ('latency frame -> ~/output, median (ms)', 'output_median_ms', '{:.2f}', ''),
        ('inference in the node, median (ms)', 'inference_median_ms', '{:.2f}', ''),
        ('frames sent', 'sent', '{}', ''),
        ('Twists received for them', 'twists', '{}', '= frames sent'),
        ('node: frames received / skipped / superseded / late', None, '', ''),
        ('node CPU (% of one core)', 'cpu_percent', '{:.0f}', ''),
        ('node CPU per frame received (ms)', 'cpu_ms_per_frame', '{:.2f}', ''),
        ('node peak RSS (MB)', 'peak_rss_mb', '{:.0f}', '<= 300'),
        ('~/reset round trip while stepping, median / p90 / max (ms)', None, '', 'p90 <= 5'),
        ('outputs out of stamp order', 'out_of_order', '{}', '0'),
        ('outputs arriving after a newer frame was sent', 'overtaken', '{}', '0'),
    ]
    for label, key, fmt, target in rows:
        if label.startswith('node: frames'):
            cells = [
                f'{r["received"]} / {r["skipped"]} / {r["superseded"]} / {r["late"]}'
                for r in results
            ]
        elif label.startswith('~/reset'):
            cells = [
                f'{r["service_median_ms"]:.1f} / {r["service_p90_ms"]:.1f} / '
                f'{r["service_max_ms"]:.1f}'
                for r in results
            ]
        else:
            cells = [fmt.format(r[key]) for r in results]
        print(f'| {label} | ' + ' | '.join(cells) + f' | {target} |')
    print('\nStages, as the node timed them (its /diagnostics at the end, ms):\n')
    print(
        '| stage (median over the last 300 frames) | '
        + ' | '.join(r['backend'] for r in results)
        + ' |'
    )
    print('|---|' + '---:|' * len(results))
    cells = ' | '.join(f'{r["lateness_median_ms"]:.2f}' for r in results)
    print(f'| (bench) frame published after its scheduled stamp: in the frame age | {cells} |')
    for key, label in STAGE_KEYS:
        print(f'| {label} | ' + ' | '.join(r['stages'].get(key, 'n/a') for r in results) + ' |')
    lite = next((r for r in results if r['backend'] == 'litert'), None)
    if lite is not None:
        ok = (
            lite['median_ms'] <= 3
            and lite['p99_ms'] <= 10
            and lite['twists'] == lite['sent']
            and lite['service_p90_ms'] <= 5
            and lite['peak_rss_mb'] <= 300
            and lite['out_of_order'] == 0
        )
        print(f'\nlitert targets: {"met" if ok else "NOT met"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
