"""policy_node: camera frames in, the LSTM policy stepped on each, Twist commands out.

Example: ``policy_node --ros-args -p bundle:=runs/bundle -r image:=/camera/image_raw``

The ROS glue around ``runtime.policy.Policy`` (DESIGN §1, §4, §5); which frames are stepped
(``frame_gate``), what is reported (``node_stats``) and the parameters (``policy_node_config``)
live in pure modules tested without ROS.

- ``image`` (sensor_msgs/Image, or CompressedImage with ``compressed:=true``): each frame is
  checked for age and for the bundle's ``dt``, for its declared size (``max_frame_pixels``),
  decoded, checked for age again, stepped (the LSTM state carries over),
  and its action published as a Twist on ``cmd_vel`` and as ``malpi_ros/PolicyOutput`` on
  ``~/output`` with the frame's header. A frame that cannot be decoded is counted, logged
  (throttled, with the reason) and dropped: bad input never stops the node and never yields a
  command. Any other failure in the callback is logged, counted and answered with a zero Twist.
- No command computed for ``stop_after`` seconds: one zero Twist (``frame_gate.SilenceWatch``
  says why once, not repeatedly). Its timer runs on the steady clock and silence is measured
  with ``time.monotonic()``, so ``use_sim_time`` cannot switch it off; ``use_sim_time`` itself
  is read-only (chosen at start) and only moves frame ages onto ``/clock``
  (``frame_gate.SimClockWatch``: no running ``/clock``, no fresh frames).
- ``applied`` (``malpi_ros/AppliedCommand``, remapped to ``/motor_driver_node/applied``): what
  the motor driver applied. While it says teleop, the node *keeps stepping and publishing*
  (its state stays current for the hand-back; the driver ignores its commands) and each
  ``~/output`` says ``overridden: true``. With ``reset_on_handback`` the state is zeroed before
  the first step after a takeover ends.
- ``~/reset`` (std_srvs/Trigger): zero the LSTM state; the answer says after how many steps.
- ``~/enable`` (std_srvs/SetBool): ``false`` publishes one zero Twist and stops publishing on
  ``cmd_vel``. The node *keeps stepping* while disabled and publishes ``~/output`` with
  ``enabled: false``, so an operator can watch what the policy would do (and diagnostics show
  it alive) before handing it the wheels. ``true`` resets the state first, so a drive always
  starts from a zero state, and resumes commands.
- ``/diagnostics`` every ``diagnostics_period``: rates, inference time, frame age, counts, and
  p50/p99/max of each latency stage (``runtime.latency``): the node's own from its stamps, the
  applying one and end to end from the driver's ``applied``, matched by the command's stamp.
- Stage stamps: each ``~/output`` carries when the frame was received, preprocessed, stepped
  and its Twist published, on the node's clock (one clock reading per frame; the stages are
  timed with ``time.perf_counter_ns``, as ``StepTimes`` is, and placed on the clock from it).
- SIGINT/SIGTERM: a final zero Twist, acknowledged by the subscribers, then exit code 0. A bad
  parameter or bundle: one FATAL line naming it, exit code 2.

Threads: rclpy's ``EventsExecutor`` (C++, one thread) runs every callback, a stepping thread
(``runtime.newest.NewestWorker``) steps the frames and another one builds the diagnostics
reports. The image callback only notes the time and hands the frame over, so ``~/reset``,
``~/enable`` and the stop timer never wait behind a step nor a report; a frame that arrives
while one is stepped waits in a slot of one, where a newer frame replaces it (counted
``superseded``). Measured on 2 cores (README, Benchmarks): rclpy's multi-threaded executor
spent ~5 ms of Python per frame rebuilding its wait set in its own thread, about half the
node's CPU. ``Policy.reset`` is thread-safe (a reset during a step wins). The command lock makes
"check enabled, publish cmd_vel" atomic against ``~/enable``: no command of a step can arrive
after the zero Twist of a disable, nor after the last words (``close`` ends the stepping thread
first).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, NamedTuple

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Twist
from rclpy.duration import Duration
from rclpy.experimental import EventsExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import SetBool, Trigger

from malpi_ros.errors import BundleError, DecodeError, MalpiError
from malpi_ros.msg import AppliedCommand, PolicyOutput
from malpi_ros.nodes.policy_node_config import (
    APPLIED_TOPIC,
    CMD_VEL_TOPIC,
    IMAGE_TOPIC,
    NODE_NAME,
    PARAMETERS,
    PolicyNodeConfig,
)
from malpi_ros.nodes.runner import (
    declare_parameters,
    freeze_use_sim_time,
    run_node,
    set_time,
    steady_timer,
)
from malpi_ros.runtime import image, latency
from malpi_ros.runtime.actions import twist_for
from malpi_ros.runtime.frame_gate import LATE, SKIPPED, FrameGate, SilenceWatch, SimClockWatch
from malpi_ros.runtime.newest import NewestWorker
from malpi_ros.runtime.node_stats import NodeStats
from malpi_ros.runtime.policy import Policy, StepTimes
from malpi_ros.runtime.takeover import SOURCES, OverrideWatch

LOG_PERIOD = 2.0  # s between repeated logs of one kind of bad frame or error
FLUSH_TIMEOUT = 1.0  # s to wait for the final zero Twist to be acknowledged
# s: an ~/applied report older than this flags nothing (the driver reports at 10 Hz and at
# every change; a driver that died mid-takeover must not flag the rest of the drive).
APPLIED_STALE = 1.0
STEP_DRAIN = 1.0  # s: how long close() waits for a step (or a report) in progress to end
# Published steps kept to match the driver's ~/applied to (live latency): the driver applies a
# command within milliseconds, so a few frames are plenty.
RECENT_STEPS = 16

# Sensor data, depth 1: the LSTM must step on the newest frame; a queue would feed it frames
# that are already stale and delay every command by the queue's length (DESIGN §6: a slow
# subscriber at depth 10 lagged ~320 ms). Best effort: a lost frame is replaced by the next,
# a retransmitted one would arrive too late to matter. Matches reliable publishers too.
# Seen here: across processes Fast DDS delivers a best-effort sample through shared memory only
# if it fits the *publisher's* segment (512 KiB by default); larger raw frames (640x480 rgb8 is
# 900 KiB) went over UDP fragments and 0 of 20 arrived. The camera process needs a Fast DDS
# profile with a larger SHM segment_size, or use compressed:=true, or a smaller camera frame.
IMAGE_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.BEST_EFFORT,
    durability=DurabilityPolicy.VOLATILE,
)


def load_policy(cfg: PolicyNodeConfig) -> Policy:
    """The bundle on the chosen backend, warmed up; a failure is a BundleError naming the path.

    One step on a blank frame at start-up, so the first camera frame does not pay for lazy
    initialisation (seen here: the keras step's first call ~260 ms, then ~7 ms), then the state
    and the selector's random sequence are reset: the node starts exactly as a fresh Policy.
    """
    selector = cfg.selector()
    try:
        policy = Policy.from_bundle(
            cfg.bundle,
            cfg.backend,
            num_threads=cfg.num_threads,
            selector=selector,
            precision=cfg.precision,
        )
        model = policy.config.model
        policy.step(np.zeros((model.height, model.width, 3), np.uint8))
    except MalpiError:
        raise  # already names the file and the field
    except Exception as err:  # a runtime's own failure (e.g. a model file it cannot read)
        raise BundleError(
            f'{cfg.bundle}: cannot load with the {cfg.backend} backend: '
            f'{type(err).__name__}: {err}'
        ) from err
    policy.reset()
    selector.reset()
    return policy


class _Frame(NamedTuple):
    """A frame as the image callback handed it over: the message, ``perf_counter_ns`` when the
    callback began, and the node's clock (ns) read at ``perf_counter_ns`` ``anchor``."""

    msg: Image | CompressedImage
    started: int
    clock_ns: int
    anchor: int


def _stamp_seconds(stamp: Any) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


class PolicyNode(Node):
    """Steps a bundle's policy on camera frames and publishes its commands (see module doc)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        freeze_use_sim_time(self)
        self.cfg = PolicyNodeConfig(**declare_parameters(self, PARAMETERS))
        self.policy = load_policy(self.cfg)
        self.cfg.check_dt(self.policy.dt)
        self._actions = self.policy.config.actions
        self.gate = FrameGate(
            self.policy.dt,
            max_frame_age=self.cfg.max_frame_age,
            reset_after_gap=self.cfg.reset_after_gap,
            respect_dt=self.cfg.respect_dt,
            reset_every_frame=self.cfg.reset_every_frame,
        )
        self.stats = NodeStats()
        self._sim_clock = SimClockWatch(self.cfg.max_frame_age)
        self._silence = SilenceWatch(self.cfg.stop_after)
        self._cmd_lock = threading.Lock()  # guards _enabled, _epoch and publishing on cmd_vel
        self._enabled = self.cfg.start_enabled
        self._epoch = 0  # +1 on every enable/disable: a step begun before it commands nothing
        # Set by ~/enable true, applied by the next step before it runs: the first command after
        # enabling comes from a zero state, whatever step was in flight during the call.
        self._reset_pending = False
        self._override = OverrideWatch(APPLIED_STALE)  # guarded by _cmd_lock
        # Published steps not yet seen applied, and the last command matched (its stamp): the
        # driver repeats a report at its rate, one command counts once. Guarded by _cmd_lock.
        self._recent: deque[latency.PolicyStamps] = deque(maxlen=RECENT_STEPS)
        self._matched_command = 0
        # Built once, refilled per frame by the stepping thread alone (publish() serializes a
        # message before it returns): a message costs more to construct than to fill.
        self._twist = Twist()
        self._out = PolicyOutput()

        # The stepping thread (module doc, Threads): frames are stepped there, never on the
        # executor's thread, which the services and the stop timer need.
        self._frames: NewestWorker[_Frame] = NewestWorker(
            self._on_frame, self._on_worker_error, name='policy_node-step'
        )
        # The diagnostics report too (percentiles of every stage: milliseconds of numpy, more
        # on a loaded machine), so that it never holds up a frame's hand-over or a service.
        self._reports: NewestWorker[float] = NewestWorker(
            self._report, self._on_worker_error, name='policy_node-diagnostics'
        )

        # Reliable depth 10, as teleop and nav2 publish cmd_vel: the final zero must arrive.
        self._cmd = self.create_publisher(Twist, CMD_VEL_TOPIC, 10)
        self._output = self.create_publisher(PolicyOutput, '~/output', 10)
        self._diagnostics = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        msg_type = CompressedImage if self.cfg.compressed else Image
        self._image_sub = self.create_subscription(
            msg_type, IMAGE_TOPIC, self._on_image, IMAGE_QOS
        )
        # Reliable depth 10, as the driver publishes it: a takeover's start and end both count.
        self.create_subscription(AppliedCommand, APPLIED_TOPIC, self._on_applied, 10)
        self.create_service(Trigger, '~/reset', self._on_reset)
        self.create_service(SetBool, '~/enable', self._on_enable)
        # Check silence at a fraction of stop_after, so the stop comes at most ~25% late.
        period = min(0.05, self.cfg.stop_after / 4)
        steady_timer(self, period, self._on_silence_tick)
        steady_timer(self, self.cfg.diagnostics_period, self._on_diagnostics)

        model = self.policy.config.model
        self.get_logger().info(
            f'bundle {self.cfg.bundle} on {self.policy.backend} ({self.policy.precision}): '
            f'{model.height}x{model.width}x{model.channels}, dt {self.policy.dt} s, actions '
            f'{", ".join(self._actions.names)}, selection {self.cfg.selection}; '
            f'{"enabled" if self._enabled else "disabled"}, waiting for frames on '
            f'{self._image_sub.topic_name} ({msg_type.__name__})'
        )

    @property
    def enabled(self) -> bool:
        with self._cmd_lock:
            return self._enabled

    # -- frames ----------------------------------------------------------------------------

    def _on_image(self, msg: Image | CompressedImage) -> None:
        """On the executor's thread: note when the frame came and hand it to the stepping thread
        (a frame still waiting there is replaced by this newer one and counted superseded)."""
        started = time.perf_counter_ns()  # per-stage times for /diagnostics (~1 us to take)
        now_ns = self.get_clock().now().nanoseconds
        anchor = time.perf_counter_ns()  # the stage marks go on the clock from this pair
        if self._frames.offer(_Frame(msg, started, now_ns, anchor)):
            self.stats.frame(None)
            self.stats.count('superseded')

    def _on_frame(self, frame: _Frame) -> None:
        """On the stepping thread: one frame, all of it."""
        try:
            self._step_on(frame)
        except Exception as err:  # DESIGN §7.6: log, count, stop, go on
            self.stats.count('errors')
            self.get_logger().error(
                f'frame callback failed ({self.stats.counts["errors"]} errors so far): '
                f'{type(err).__name__}: {err}',
                throttle_duration_sec=LOG_PERIOD,
            )
            try:
                self._publish_command(Twist(), self._epoch_now())
            except Exception as stop_err:  # e.g. the context is going down: nothing left to do
                self.get_logger().error(
                    f'could not publish the zero Twist: {stop_err}',
                    throttle_duration_sec=LOG_PERIOD,
                )

    def _on_worker_error(self, err: BaseException) -> None:
        """A worker's handler raised (a report, or ``_on_frame``'s own guard): count and log it;
        the stop timer stops the wheels if no command follows."""
        self.stats.count('errors')
        self.get_logger().error(
            f'{type(err).__name__} in a worker thread: {err}', throttle_duration_sec=LOG_PERIOD
        )

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _step_on(self, frame: _Frame) -> None:
        msg, started, now_ns, anchor = frame
        taken = time.perf_counter_ns()
        clock = self.get_clock()
        now = now_ns * 1e-9
        if clock.ros_time_is_active:  # type: ignore[attr-defined]  # a ROSClock
            problem = self._sim_clock.problem(now, time.monotonic())
            if problem is not None:
                self.stats.frame(None)
                self.stats.count('late')
                self.get_logger().warning(
                    f'dropped a frame as late ({self.stats.counts["late"]} so far): its age '
                    f'cannot be told, {problem}',
                    throttle_duration_sec=LOG_PERIOD,
                )
                return
        decision = self.gate.decide(_stamp_seconds(msg.header.stamp), now)
        self.stats.frame(decision.age)
        if decision.verdict == LATE:
            self.stats.count('late')
            self.get_logger().warning(
                f'dropped a late frame ({self.stats.counts["late"]} so far): {decision.age:.3f} s '
                f'old (max_frame_age {self.cfg.max_frame_age} s) or not newer than the last '
                'stepped one',
                throttle_duration_sec=LOG_PERIOD,
            )
            return
        if decision.verdict == SKIPPED:
            self.stats.count('skipped')  # normal when the camera is faster than dt: no log
            return
        try:
            decode_started = time.perf_counter_ns()
            rgb = image.decode(msg, self.cfg.max_frame_pixels)
            decoded = time.perf_counter_ns()
        except DecodeError as err:
            self.stats.count('malformed')
            self.get_logger().warning(
                f'dropped a malformed frame ({self.stats.counts["malformed"]} so far): {err}',
                throttle_duration_sec=LOG_PERIOD,
            )
            return
        after_decode = self._now()
        if self.gate.too_old(decision.time, after_decode):
            self.stats.count('late')
            self.get_logger().warning(
                f'dropped a frame that went stale while decoding ({self.stats.counts["late"]} '
                f'late so far): {after_decode - decision.time:.3f} s old after decoding '
                f'(max_frame_age {self.cfg.max_frame_age} s)',
                throttle_duration_sec=LOG_PERIOD,
            )
            return
        if decision.reset:
            if decision.why != 'every frame':
                self.get_logger().info(f'{decision.why}: LSTM state reset')
            self.policy.reset()
        epoch = self._take_epoch()
        result = self.policy.step(rgb)
        # The command first: everything below it (the gate, counters, ~/output, stage times)
        # waits until the Twist is out (it is what the wheels wait for).
        linear_x, angular_z = twist_for(result.action, self._actions)
        twist = self._twist  # reused (see __init__)
        twist.linear.x = linear_x
        twist.angular.z = angular_z
        stamps, overridden = self._command_step(
            twist, epoch, msg.header.stamp, (now_ns, anchor), started, result.times
        )
        commanded = stamps.published != 0
        command_done = time.perf_counter_ns()
        self.gate.stepped(decision.time)
        self.stats.step(result.inference_ms)
        out = self._out  # reused, as the Twist
        out.header = msg.header
        out.probabilities = result.probabilities.tolist()
        out.action = result.action
        out.action_name = result.action_name
        out.step = result.step
        out.inference_ms = result.inference_ms
        out.enabled = commanded
        out.overridden = overridden
        set_time(out.received, stamps.received)
        set_time(out.preprocessed, stamps.preprocessed)
        set_time(out.stepped, stamps.stepped)
        set_time(out.published, stamps.published)
        self._output.publish(out)
        done = time.perf_counter_ns()
        self.stats.stamped(stamps)
        self.stats.timed(
            handoff=(taken - started) * 1e-6,
            decode=(decoded - decode_started) * 1e-6,
            fit=result.times.fit_ms,
            normalize=result.times.normalize_ms,
            model=result.times.model_ms,
            output=(done - command_done) * 1e-6,
            callback=(done - started) * 1e-6,
            # Twist built and published (none while disabled: nothing to time).
            **({'command': (stamps.published - stamps.stepped) * 1e-6} if commanded else {}),
        )

    def _epoch_now(self) -> int:
        with self._cmd_lock:
            return self._epoch

    def _take_epoch(self) -> int:
        """The epoch a step runs in; first applies a reset asked for by ~/enable or a hand-back."""
        with self._cmd_lock:
            if self._reset_pending:
                self.policy.reset()
                self._reset_pending = False
            return self._epoch

    def _publish_command(self, twist: Twist, epoch: int) -> bool:
        """Publish on cmd_vel if enabled and not switched since ``epoch``; True if published."""
        with self._cmd_lock:
            if not self._enabled or self._epoch != epoch:
                return False
            self._cmd.publish(twist)
            return True

    def _command_step(
        self,
        twist: Twist,
        epoch: int,
        frame: Any,
        clock: tuple[int, int],
        started: int,
        times: StepTimes,
    ) -> tuple[latency.PolicyStamps, bool]:
        """Publish a step's Twist as ``_publish_command`` does, then its stamps and whether a
        takeover overrides it. One hold of the command lock: the driver's ``~/applied`` for
        this command (back within a millisecond or two) waits for its step to be in ``_recent``.
        ``clock``: (the node's clock, ``perf_counter_ns``) read together at the callback's start.
        """
        with self._cmd_lock:
            published = 0
            if self._enabled and self._epoch == epoch:
                self._cmd.publish(twist)
                published = time.perf_counter_ns()
            now = time.monotonic()
            if published:
                self._silence.feed(now)
            overridden = self._override.overridden(now)
            received, preprocessed, stepped, sent = latency.on_clock(
                *clock, (started, times.normalized_ns, times.end_ns, published)
            )
            stamps = latency.PolicyStamps(
                latency.stamp_ns(frame), received, preprocessed, stepped, sent
            )
            if sent and not overridden:
                self._recent.append(stamps)
        return stamps, overridden

    # -- takeover --------------------------------------------------------------------------

    def _on_applied(self, msg: AppliedCommand) -> None:
        source = SOURCES[msg.source] if msg.source < len(SOURCES) else f'source {msg.source}'
        command = latency.stamp_ns(msg.command_stamp)
        with self._cmd_lock:
            ended = self._override.applied(source, time.monotonic())
            if ended and self.cfg.reset_on_handback:
                self._reset_pending = True  # applied by the next step, before it runs
            step = None
            if msg.source == AppliedCommand.SOURCE_POLICY and command != self._matched_command:
                step = latency.owner(self._recent, command)  # _recent is in step order
            if step is not None:
                self._matched_command = command
                self._recent.remove(step)
        if step is not None:
            self.stats.stamped(step, latency.stamp_ns(msg.applied_stamp))
        if ended:
            self.get_logger().info(
                f'takeover ended (control: {source})'
                + ('; LSTM state reset before the next step' if self.cfg.reset_on_handback else '')
            )

    # -- timers ----------------------------------------------------------------------------

    def _on_silence_tick(self) -> None:
        with self._cmd_lock:  # with the lock: a step cannot publish between check and stop
            if not (self._enabled and self._silence.expired(time.monotonic())):
                return
            self._cmd.publish(Twist())
        self.get_logger().warning(
            f'no command computed for {self.cfg.stop_after} s (no usable frames): '
            'published a zero Twist'
        )

    def _on_diagnostics(self) -> None:
        """On the executor's thread: ask the report thread for a report (one at a time)."""
        self._reports.offer(time.monotonic())

    def _report(self, now: float) -> None:
        report = self.stats.report(
            now,
            extra=(
                ('steps_since_reset', str(self.policy.steps_since_reset)),
                ('enabled', str(self.enabled).lower()),
                ('backend', self.policy.backend),
                ('precision', self.policy.precision),
                ('bundle', self.cfg.bundle),
                ('dt_s', f'{self.policy.dt:g}'),
                ('takeovers', str(self._override.takeovers)),
            ),
        )
        status = DiagnosticStatus()
        status.level = bytes([report.level])
        status.name = f'{self.get_name()}: policy'
        status.message = report.message
        status.hardware_id = self.get_fully_qualified_name()
        status.values = [KeyValue(key=k, value=v) for k, v in report.values]
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = [status]
        self._diagnostics.publish(array)

    # -- services --------------------------------------------------------------------------

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Any:
        steps = self.policy.steps_since_reset
        self.policy.reset()
        self.get_logger().info(f'~/reset: LSTM state reset after {steps} steps')
        response.success = True
        response.message = f'reset after {steps} steps'
        return response

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> Any:
        if request.data:
            steps = self.policy.steps_since_reset
            with self._cmd_lock:
                self._enabled = True
                self._epoch += 1
                self._reset_pending = True
            response.message = f'enabled; state reset after {steps} steps'
        else:
            with self._cmd_lock:
                self._enabled = False
                self._epoch += 1
                self._cmd.publish(Twist())
                self._silence.disarm()  # that zero was the stop; no more cmd_vel from now on
            response.message = 'disabled: zero Twist published; stepping goes on (~/output)'
        self.get_logger().info(f'~/enable: {response.message}')
        response.success = True
        return response

    # -- shutdown --------------------------------------------------------------------------

    last_words = 'publishing a zero Twist and exiting'  # close(), said in the log

    def close(self) -> None:
        """End the stepping thread, publish a final zero Twist and wait until it is acknowledged
        (call with no spin)."""
        if not self._frames.stop(STEP_DRAIN):
            # A step still running: the epoch below keeps its command off cmd_vel.
            self.get_logger().warning(f'a step did not end within {STEP_DRAIN} s')
        self._reports.stop(STEP_DRAIN)
        with self._cmd_lock:
            self._enabled = False
            self._epoch += 1
            self._cmd.publish(Twist())
        if self.context.ok():
            # The process exits right after this: wait until subscribers acknowledged the stop.
            self._cmd.wait_for_all_acked(Duration(seconds=FLUSH_TIMEOUT))


def main(args: list[str] | None = None) -> None:
    """Run until SIGINT/SIGTERM (then a last zero Twist); exit 2 on a bad parameter or bundle."""
    run_node(
        NODE_NAME,
        PolicyNode,
        args,
        executor=EventsExecutor,
    )


if __name__ == '__main__':
    main()
