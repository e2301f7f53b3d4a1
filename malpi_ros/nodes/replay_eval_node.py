"""replay_eval_node: a recording pushed through the live policy_node, scored against evaluate.

Example: ``malpi-ros replay-eval bundles/malpi_v1 drive_07 --out runs/replay_07``

``replay_eval`` does, in order:

1. Offline: ``evaluate_bundle`` over the bag (the same runtime backend the node will use):
   episodes, per-frame labels and evaluation's actions. A bad bag or bundle fails here, before
   any process starts, with the message that names it.
2. Starts the *installed* ``policy_node`` (``<prefix>/lib/malpi_ros/policy_node``, as
   ``ros2 run`` finds it) as a subprocess in the namespace ``/replay_eval`` (so nothing of a
   replay reaches a robot's ``/cmd_vel``), and a ``Recorder`` (record_node) writing its
   ``cmd_vel`` and ``~/output`` into ``RUN_DIR/run_bag`` (mcap).
3. Publishes the camera frames of evaluation's episodes to the node's ``image``, episode by
   episode, calling ``~/reset`` before each (``reset_each_episode``). Each frame is the bag's
   CDR bytes with only the header stamp set (``replay.restamp_cdr``): to its bag receive time in
   lockstep (the clock evaluation aligns on, so every output is matched to its frame even when
   the camera left stamps at zero), to the wall clock in realtime mode (so the node's age check
   and dt gate see what they would see on the robot).
4. Lockstep (default): frame i+1 goes out once the output of frame i (and its cmd_vel) came
   back, or ``frame_timeout`` passed; a frame with no output after ``RESEND`` s is sent again
   (best effort can lose one; the node's gate drops a copy of a frame it already stepped).
   The node's dt gate and age check are off, so it steps every frame and must agree with
   evaluation on every one. Realtime: the bag's timing, each frame sent once.
5. Stops the node (SIGINT: its final zero Twist is recorded) and the recorder (the bag is
   closed, so it is valid), and scores it (``replay.episode_report``).

Latency is measured from publishing a frame to receiving the cmd_vel computed from it (the
first cmd_vel after it was published; its ~/output when the node is disabled). SIGINT or
SIGTERM stop the replay between two frames; everything is shut down the same way and the
partial report says ``interrupted``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import rclpy
from geometry_msgs.msg import Twist
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from malpi_ros.bagio import reader as bagio
from malpi_ros.bagio.replay import (
    FramePlan,
    FrameResult,
    ReplayEvalConfig,
    ReplayReport,
    Seen,
    Throttle,
    choose_qos,
    episode_reports,
    frame_results,
    node_arguments,
    node_param,
    plan_frames,
    restamp_cdr,
)
from malpi_ros.errors import ConfigError, MalpiError
from malpi_ros.learn.evaluate import EvaluationReport, evaluate_bundle
from malpi_ros.msg import PolicyOutput
from malpi_ros.nodes.policy_node_config import NODE_NAME as POLICY_NODE
from malpi_ros.nodes.policy_node_config import PARAMETERS
from malpi_ros.nodes.record_node import Recorder
from malpi_ros.nodes.topics import SETTLE, qos_profile, wait_until
from malpi_ros.processes import installed, stop_process
from malpi_ros.runtime.bundle import load_bundle
from malpi_ros.runtime.frame_gate import FrameGate

NODE_NAME = 'replay_eval'
RUN_BAG = 'run_bag'
NODE_LOG = 'policy_node.log'
MATCH_TOLERANCE_NS = 1000  # evaluation's stamps are float seconds: ~240 ns resolution at 1.7e9 s
COMMAND_WAIT = 0.5  # s to wait for a frame's cmd_vel once its ~/output came (lockstep)
RESEND = 0.5  # s without an output before a frame is sent again (lockstep)
DRAIN = 1.0  # s to wait for the last outputs after the last frame (realtime)
NODE_STOP_TIMEOUT = 10.0
# Reliable and deep: every output and command of the run must reach the scoring.
RESULTS_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE
)


class ReplayEvalNode(Node):
    """Publishes frames to the replayed node, collects its outputs and commands, resets it."""

    def __init__(
        self, cfg: ReplayEvalConfig, compressed: bool, *, context: Context | None = None
    ) -> None:
        super().__init__(NODE_NAME, context=context)
        self._cond = threading.Condition()
        self.outputs: dict[int, Seen] = {}  # header stamp (ns) -> output
        self.commands: list[float] = []  # arrival times of cmd_vel messages
        msgtype = 'sensor_msgs/msg/CompressedImage' if compressed else 'sensor_msgs/msg/Image'
        self._image = self.create_publisher(
            CompressedImage if compressed else Image,
            cfg.topic('image'),
            qos_profile(choose_qos(msgtype)),  # as a camera publishes
        )
        self.create_subscription(
            PolicyOutput, cfg.topic(f'{POLICY_NODE}/output'), self._on_output, RESULTS_QOS
        )
        self.create_subscription(Twist, cfg.topic('cmd_vel'), self._on_command, RESULTS_QOS)
        self._reset: Any = self.create_client(Trigger, cfg.topic(f'{POLICY_NODE}/reset'))

    def _on_output(self, msg: PolicyOutput) -> None:
        seen = Seen(time.monotonic(), int(msg.action), int(msg.step), bool(msg.enabled))
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self._cond:
            self.outputs[stamp] = seen
            self._cond.notify_all()

    def _on_command(self, _msg: Twist) -> None:
        with self._cond:
            self.commands.append(time.monotonic())
            self._cond.notify_all()

    def ready(self) -> bool:
        """The node subscribes to our frames and answers ~/reset."""
        return self._image.get_subscription_count() > 0 and self._reset.service_is_ready()

    def publish(self, data: bytes) -> float:
        """Publish one serialized frame; returns the monotonic time just before."""
        at = time.monotonic()
        self._image.publish(data)
        return at

    def snapshot(self) -> tuple[dict[int, Seen], list[float]]:
        """Copies of the outputs (by stamp) and the command arrival times so far."""
        with self._cond:
            return dict(self.outputs), list(self.commands)

    def command_count(self) -> int:
        with self._cond:
            return len(self.commands)

    def wait(self, predicate: Callable[[], bool], timeout: float, stop: threading.Event) -> bool:
        """Wait (woken by every output and command) until predicate() holds; False on timeout
        or stop. The predicate runs under the lock."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def output(self, stamp_ns: int) -> Seen | None:
        with self._cond:
            return self.outputs.get(stamp_ns)

    def reset(self, timeout: float, stop: threading.Event) -> str | None:
        """Call ~/reset and wait for the answer; None when stopped first."""
        future = self._reset.call_async(Trigger.Request())
        answered = threading.Event()
        future.add_done_callback(lambda _f: answered.set())
        deadline = time.monotonic() + timeout
        while not answered.wait(0.05):
            if stop.is_set():
                future.cancel()
                return None
            if time.monotonic() > deadline:
                future.cancel()
                raise MalpiError(f'policy_node did not answer ~/reset within {timeout} s')
        response = future.result()
        if response is None or not response.success:
            raise MalpiError(f'policy_node refused ~/reset: {getattr(response, "message", "")}')
        return str(response.message)


class _Graph:
    """A ReplayEvalNode spinning in a thread, on an rclpy context of its own."""

    def __init__(self, cfg: ReplayEvalConfig, compressed: bool) -> None:
        self._cfg, self._compressed = cfg, compressed
        self.context = Context()
        self.node: ReplayEvalNode | None = None
        self._executor: SingleThreadedExecutor | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ReplayEvalNode:
        rclpy.init(
            args=[],  # not sys.argv: rcl would take a --param value 'a:=b' for a remap rule
            context=self.context,
            signal_handler_options=SignalHandlerOptions.NO,
        )
        try:
            self.node = ReplayEvalNode(self._cfg, self._compressed, context=self.context)
            self._executor = SingleThreadedExecutor(context=self.context)
            self._executor.add_node(self.node)
            self._thread = threading.Thread(target=self._spin, name=NODE_NAME, daemon=True)
            self._thread.start()
        except BaseException:
            self.__exit__()
            raise
        return self.node

    def _spin(self) -> None:
        assert self._executor is not None
        with suppress(ExternalShutdownException):
            self._executor.spin()

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(timeout_sec=5.0)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self.node is not None:
            with suppress(Exception):
                self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


# -- the policy_node process ------------------------------------------------------------------


def policy_node_command() -> list[str]:
    """How to start the installed policy_node with this interpreter (``processes.installed``),
    or ``python -m malpi_ros.nodes.policy_node`` where none is installed."""
    try:
        return installed(POLICY_NODE)
    except MalpiError:
        return [sys.executable, '-m', 'malpi_ros.nodes.policy_node']


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return '\n'.join(path.read_text(errors='replace').splitlines()[-lines:])
    except OSError:
        return '(no log)'


# -- the plan ---------------------------------------------------------------------------------


def _results(
    cfg: ReplayEvalConfig,
    node: ReplayEvalNode,
    sent: Sequence[tuple[int, float] | None],
    dt: float,
) -> list[FrameResult]:
    """Score what was sent against what came back (``replay.frame_results``); in realtime runs
    with the node's frame gate, set up as the replayed node has it."""
    outputs, times = node.snapshot()
    gate = None
    if cfg.realtime:
        gate = FrameGate(
            dt,
            max_frame_age=_param(cfg, 'max_frame_age'),
            reset_after_gap=_param(cfg, 'reset_after_gap'),
            respect_dt=_param(cfg, 'respect_dt'),
        )
    return frame_results(sent, outputs, times, gate)


def _param(cfg: ReplayEvalConfig, name: str) -> Any:
    return node_param(cfg, name, PARAMETERS[name].default)


# -- the replay -------------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """The run directory may be new or empty: a replay never overwrites an earlier one."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f'--out {out} exists and is not an empty directory; not overwriting it')


def evaluate_offline(
    bundle: str | Path,
    bag: str | Path,
    cfg: ReplayEvalConfig,
    log: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """``malpi-ros evaluate`` on the bag with the node's backend: the frames and actions the
    node is held to (no parity check: that is evaluate's business and needs TensorFlow)."""
    if log is not None:
        log(f'evaluating {bundle} offline on {bag} ({cfg.backend})')
    return evaluate_bundle(
        bundle,
        [bag],
        backend=cfg.backend,
        parity=False,
        image_topic=cfg.image_topic,
        cmd_topic=cfg.cmd_topic,
    )


def replay_eval(
    bundle: str | Path,
    bag: str | Path,
    out: str | Path,
    cfg: ReplayEvalConfig,
    *,
    evaluation: EvaluationReport | None = None,
    stop: threading.Event | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ReplayReport:
    """Replay ``bag`` through a policy_node running ``bundle``; record into ``out/run_bag``.

    ``evaluation``: ``evaluate_offline``'s result when the caller ran it already. Returns the
    report (``interrupted`` when ``stop`` was set). The run bag is closed and the node process
    stopped in every case. rclpy runs on contexts of this function's own.
    """
    stop = stop if stop is not None else threading.Event()
    say = log if log is not None else (lambda _line: None)
    out = Path(out)
    check_out(out)
    if evaluation is None:
        evaluation = evaluate_offline(bundle, bag, cfg, log=log)
    dt = load_bundle(bundle, verify=False).dt

    with bagio.open_bag(bag) as source:
        topics = bagio.find_topics(source, cfg.image_topic, cfg.cmd_topic)
        compressed = topics.image_kind == 'compressed'
        node_args = node_arguments(
            cfg,
            str(Path(bundle).resolve()),
            compressed=compressed,
            reset_after_gap=evaluation.dataset.gap,
        )
        image_messages = source.topics[topics.image_topic][1]
        plans, stamps = plan_frames(evaluation, source.reader.start_time)
        sent: list[tuple[int, float] | None] = [None] * len(plans)
        out.mkdir(parents=True, exist_ok=True)
        recorder = Recorder(
            out / RUN_BAG,
            [cfg.topic('cmd_vel'), cfg.topic(f'{POLICY_NODE}/output')],
            ros_args=[],  # not sys.argv (see _Graph)
        )
        node_log = out / NODE_LOG
        proc: subprocess.Popen[bytes] | None = None
        interrupted = False
        commands_received = 0
        recorder.start()
        try:
            proc = _start_policy_node(node_args, node_log, say)
            with _Graph(cfg, compressed) as node:
                interrupted = not _wait_ready(node, recorder, proc, cfg, stop, node_log)
                if not interrupted:
                    stop.wait(SETTLE)  # the node's side of the image match (topics.SETTLE)
                    say(
                        f'replaying {len(plans)} frames of {len(evaluation.episodes)} episode(s) '
                        f'({"realtime" if cfg.realtime else "lockstep"}) into {out / RUN_BAG}'
                    )
                    interrupted = not _play(
                        source, topics.image_topic, plans, stamps, sent, node, proc, cfg,
                        stop, progress, node_log,
                    )  # fmt: skip
                results = _results(cfg, node, sent, dt)
                commands_received = node.command_count()
        finally:
            if proc is not None:
                code = stop_process(proc, NODE_STOP_TIMEOUT)
                if code not in (0, -2, 130):
                    say(f'policy_node exited with {code}; its log: {node_log}')
            time.sleep(0.2)  # the node's final zero Twist reaches the recorder
            summary = recorder.stop()
            say(summary.describe())

    return ReplayReport(
        bundle=str(bundle),
        bag=str(bag),
        image_topic=topics.image_topic,
        names=tuple(evaluation.action_names),
        episodes=episode_reports(plans, results),
        interrupted=interrupted,
        image_messages=image_messages,
        commands_received=commands_received,
        settings=_settings(cfg, node_args, out, evaluation),
    )


def _start_policy_node(
    node_args: list[str], node_log: Path, say: Callable[[str], None]
) -> subprocess.Popen[bytes]:
    """The policy_node under test, its output into ``node_log``."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    with node_log.open('wb') as log_file:
        command = [*policy_node_command(), *node_args]
        say(f'starting {" ".join(command)}')
        return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def _settings(
    cfg: ReplayEvalConfig, node_args: list[str], out: Path, evaluation: EvaluationReport
) -> dict[str, Any]:
    """How the run was made, for report.json."""
    return {
        'realtime': cfg.realtime,
        'rate': cfg.rate,
        'reset_each_episode': cfg.reset_each_episode,
        'backend': cfg.backend,
        'frame_timeout': cfg.frame_timeout,
        'namespace': cfg.namespace,
        'policy_node_arguments': node_args,
        'run_bag': str(out / RUN_BAG),
        'evaluation_dataset': {'gap': evaluation.dataset.gap, 'lag': evaluation.dataset.lag},
    }


def _wait_ready(
    node: ReplayEvalNode,
    recorder: Recorder,
    proc: subprocess.Popen[bytes],
    cfg: ReplayEvalConfig,
    stop: threading.Event,
    node_log: Path,
) -> bool:
    """Until the node takes frames and answers ~/reset and the recorder records both topics.

    False when stopped first; MalpiError when the node exits or the time runs out.
    """
    deadline = time.monotonic() + cfg.startup_timeout
    while not (node.ready() and recorder.wait_for_topics(0)):
        if proc.poll() is not None:
            raise MalpiError(
                f'policy_node exited with {proc.returncode} before it was ready; the end of '
                f'{node_log}:\n{_tail(node_log)}'
            )
        if time.monotonic() > deadline:
            raise MalpiError(
                f'policy_node was not ready within {cfg.startup_timeout} s (frames subscribed, '
                f'~/reset up, topics recorded); the end of {node_log}:\n{_tail(node_log)}'
            )
        if stop.wait(0.05):
            return False
    return True


def _await_output(
    node: ReplayEvalNode, stamp: int, data: bytes, timeout: float, stop: threading.Event
) -> bool:
    """Lockstep: wait for the output of the frame stamped ``stamp``, sending it again every
    RESEND s (a best-effort frame can be lost, e.g. before the node's side of the match is
    done). A copy the node already has is harmless: its frame gate drops a frame that is not
    newer than the last one it stepped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if node.wait(lambda: stamp in node.outputs, min(RESEND, max(left, 0.0)), stop):
            return True
        if stop.is_set() or time.monotonic() >= deadline:
            return False
        node.publish(data)


def _play(
    source: bagio.Bag,
    image_topic: str,
    plans: Sequence[FramePlan],
    stamps: Sequence[int],
    sent: list[tuple[int, float] | None],
    node: ReplayEvalNode,
    proc: subprocess.Popen[bytes],
    cfg: ReplayEvalConfig,
    stop: threading.Event,
    progress: Callable[[str], None] | None,
    node_log: Path,
) -> bool:
    """Publish the planned frames (see module doc); False when stopped before the end."""
    throttle = Throttle(1.0)
    episodes = len(dict.fromkeys(p.episode for p in plans))
    j = 0
    t0 = time.monotonic()
    for _topic, t_ns, raw in source.raw_messages([image_topic]):
        if j >= len(plans):
            break
        if t_ns < stamps[j] - MATCH_TOLERANCE_NS:
            continue  # a frame evaluation did not step (undecodable, or its label dropped)
        if t_ns > stamps[j] + MATCH_TOLERANCE_NS:
            raise MalpiError(
                f'frame at {stamps[j]} ns of the evaluation is not in {source.name} '
                f'({image_topic})'
            )
        plan = plans[j]
        if cfg.realtime and not wait_until(
            t0 + (t_ns - stamps[0]) * 1e-9 / cfg.rate, stop, time.monotonic
        ):
            return False
        if stop.is_set():
            return False
        reset = plan.index == 0 and cfg.reset_each_episode
        if reset and node.reset(cfg.frame_timeout, stop) is None:
            return False
        stamp = time.time_ns() if cfg.realtime else t_ns
        commands = node.command_count()
        data = restamp_cdr(raw, stamp)
        sent[j] = (stamp, node.publish(data))
        if not cfg.realtime:
            if _await_output(node, stamp, data, cfg.frame_timeout, stop):
                seen = node.output(stamp)
                if seen is not None and seen.enabled:
                    more = lambda c=commands: len(node.commands) > c  # noqa: E731
                    node.wait(more, COMMAND_WAIT, stop)  # type: ignore[misc]
            if proc.poll() is not None:
                raise MalpiError(
                    f'policy_node exited with {proc.returncode} during the replay; the end of '
                    f'{node_log}:\n{_tail(node_log)}'
                )
        j += 1
        if progress is not None and throttle.ready(time.monotonic()):
            stepped = len(node.snapshot()[0])
            progress(
                f'episode {plan.episode + 1}/{episodes}, frame {plan.index + 1}: '
                f'{j}/{len(plans)} played, {stepped} stepped'
            )
    if cfg.realtime and j:
        last = sent[j - 1]
        if last is not None:
            node.wait(lambda s=last[0]: s in node.outputs, DRAIN, stop)  # type: ignore[misc]
    return not stop.is_set()
