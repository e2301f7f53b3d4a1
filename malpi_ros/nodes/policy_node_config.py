"""policy_node's parameters: names, defaults, ranges, descriptions, and the checked config.

Pure (no rclpy): the launch-file test and the config tests read ``PARAMETERS`` without a ROS
graph, and ``runner.declare_parameters`` turns each ``ParamSpec`` into a read-only
``ParameterDescriptor``. The values
are read once at start-up into ``PolicyNodeConfig``; the node declares them read-only, because
a value changed later would be silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from malpi_ros.checks import flag, in_range, positive
from malpi_ros.errors import ConfigError
from malpi_ros.nodes.params import ParamSpec
from malpi_ros.runtime.actions import SELECTION_MODES, ActionSelector
from malpi_ros.runtime.bundle import PRECISIONS, check_precision
from malpi_ros.runtime.frame_size import (
    DEFAULT_MAX_FRAME_PIXELS,
    MAX_FRAME_PIXELS_CAP,
    check_max_pixels,
)
from malpi_ros.runtime.policy import BACKENDS

NODE_NAME = 'policy_node'
IMAGE_TOPIC = 'image'  # relative: remapped to the camera topic in launch files
CMD_VEL_TOPIC = 'cmd_vel'
# motor_driver_node's ~/applied (AppliedCommand): remapped to /motor_driver_node/applied.
APPLIED_TOPIC = 'applied'
# Topics the node subscribes or publishes under relative names (launch files may remap these).
TOPICS = (IMAGE_TOPIC, CMD_VEL_TOPIC, APPLIED_TOPIC)


@dataclass(frozen=True)
class PolicyNodeConfig:
    """How policy_node runs a bundle: backend, selection, timing and safety (DESIGN §4, §5).

    ``max_frame_age`` (s): frames older than this (receive time - stamp) are dropped as late,
    checked on arrival and again after decoding; 0 turns the check off (e.g. a bag replayed
    without ``use_sim_time``). Under ``use_sim_time`` ages are on ``/clock``: frames are dropped
    as late while it reads 0 (none received) or has not moved for ``max_frame_age``.
    ``max_frame_pixels``: frames declaring more pixels are refused before decoding (malformed).
    ``stop_after`` (s): no command computed for this long → one zero Twist.
    ``reset_after_gap`` (s): a gap between stepped frames longer than this starts a new
    sequence (training starts a new episode after a gap too: ``DatasetConfig.gap``, 1 s).
    ``respect_dt``: step at most once per bundle ``dt`` (frames closer than 0.8*dt skipped).
    ``reset_every_frame``: the ablation of the demo: zero the state before every step, so the
    policy sees one frame at a time and its memory cannot help.
    ``reset_on_handback``: zero the state when a teleop takeover ends (the driver's ``applied``
    goes from teleop to another source). Off by default: the policy steps on every frame during
    a takeover, so its state is as current as in a drive without one (README "Takeover").
    """

    bundle: str
    backend: str = 'litert'
    precision: str = 'fp32'  # the bundle's fp32 or int8 step model (int8: litert only)
    num_threads: int = 0  # 0: auto, one per core, 1 to 4 (runtime_litert.auto_threads)
    compressed: bool = False
    selection: str = 'argmax'
    epsilon: float = 0.0
    seed: int = 0
    max_frame_age: float = 0.5
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
    stop_after: float = 0.5
    reset_after_gap: float = 1.0
    start_enabled: bool = True
    diagnostics_period: float = 1.0
    reset_every_frame: bool = False
    respect_dt: bool = True
    reset_on_handback: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bundle, str) or not self.bundle.strip():
            raise ConfigError(
                'parameter bundle is required: the model bundle directory, e.g. '
                f'--ros-args -p bundle:=/path/to/bundle (got {self.bundle!r})'
            )
        if self.backend not in BACKENDS:
            raise ConfigError(
                f'backend must be one of {", ".join(BACKENDS)}, got {self.backend!r}'
            )
        check_precision(self.precision)
        if self.precision != 'fp32' and self.backend != 'litert':
            raise ConfigError(
                f'precision {self.precision} runs on the litert backend, got backend '
                f'{self.backend!r}'
            )
        if isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int):
            raise ConfigError(f'num_threads must be an integer >= 0, got {self.num_threads!r}')
        in_range('num_threads', self.num_threads, 0, 64)
        self.selector()  # ActionSelector checks selection, epsilon and seed
        in_range('max_frame_age', self.max_frame_age, 0.0)
        check_max_pixels(self.max_frame_pixels)
        positive('stop_after', self.stop_after)
        positive('reset_after_gap', self.reset_after_gap)
        positive('diagnostics_period', self.diagnostics_period)
        for name in (
            'compressed',
            'start_enabled',
            'reset_every_frame',
            'respect_dt',
            'reset_on_handback',
        ):
            flag(name, getattr(self, name))

    def selector(self) -> ActionSelector:
        """A new selector (its own random state, seeded) for one Policy."""
        return ActionSelector(self.selection, self.epsilon, self.seed)

    def check_dt(self, dt: float) -> None:
        """Timeouts shorter than the bundle's frame period would stop or reset every step."""
        if self.stop_after <= dt:
            raise ConfigError(
                f'stop_after ({self.stop_after} s) must be longer than the bundle dt ({dt} s): '
                'the node would stop the robot between two steps'
            )
        if self.reset_after_gap <= dt:
            raise ConfigError(
                f'reset_after_gap ({self.reset_after_gap} s) must be longer than the bundle dt '
                f'({dt} s): every step would start from a zero state'
            )


_DEFAULTS = {f.name: f.default for f in fields(PolicyNodeConfig) if f.name != 'bundle'}

# name -> spec, in the order of config/nodes/robot.yaml. Read once into PolicyNodeConfig.
PARAMETERS: dict[str, ParamSpec] = {
    'bundle': ParamSpec('', 'model bundle directory (required), written by malpi-ros train'),
    'backend': ParamSpec(
        _DEFAULTS['backend'],
        f'runtime: {" | ".join(BACKENDS)} (litert on the robot: no TensorFlow in the process)',
    ),
    'precision': ParamSpec(
        _DEFAULTS['precision'],
        f'step model: {" | ".join(PRECISIONS)} (int8: litert; add it with malpi-ros export '
        'BUNDLE --int8)',
    ),
    'num_threads': ParamSpec(
        _DEFAULTS['num_threads'],
        'threads of the LiteRT interpreter (XNNPACK); 0 = auto: one per core, 1 to 4',
        0,
        64,
    ),
    'compressed': ParamSpec(
        _DEFAULTS['compressed'],
        'subscribe sensor_msgs/CompressedImage instead of sensor_msgs/Image on image',
    ),
    'selection': ParamSpec(
        _DEFAULTS['selection'], f'action selection: {" | ".join(SELECTION_MODES)}'
    ),
    'epsilon': ParamSpec(
        _DEFAULTS['epsilon'], 'probability of a random action (selection epsilon_greedy)', 0, 1
    ),
    'seed': ParamSpec(
        _DEFAULTS['seed'], 'seed of the random action selection (runs repeat)', 0, 2**31 - 1
    ),
    'max_frame_age': ParamSpec(
        _DEFAULTS['max_frame_age'],
        'drop frames older than this, receive time minus stamp (s); 0: no check',
        0.0,
        3600.0,
    ),
    'max_frame_pixels': ParamSpec(
        _DEFAULTS['max_frame_pixels'],
        'refuse frames declaring more pixels than this, before decoding (default 4096x4096)',
        1,
        MAX_FRAME_PIXELS_CAP,
    ),
    'stop_after': ParamSpec(
        _DEFAULTS['stop_after'],
        'publish a zero Twist when no command was computed for this long (s)',
        0.01,
        60.0,
    ),
    'reset_after_gap': ParamSpec(
        _DEFAULTS['reset_after_gap'],
        'reset the LSTM state when stepped frames are further apart than this (s)',
        0.01,
        3600.0,
    ),
    'start_enabled': ParamSpec(
        _DEFAULTS['start_enabled'], 'publish cmd_vel from start-up (else wait for ~/enable)'
    ),
    'diagnostics_period': ParamSpec(
        _DEFAULTS['diagnostics_period'], 'period of the /diagnostics report (s)', 0.05, 60.0
    ),
    'reset_every_frame': ParamSpec(
        _DEFAULTS['reset_every_frame'],
        'ablation: zero the LSTM state before every step (the policy gets no memory)',
    ),
    'respect_dt': ParamSpec(
        _DEFAULTS['respect_dt'],
        "step at most once per the bundle's dt; faster frames are skipped",
    ),
    'reset_on_handback': ParamSpec(
        _DEFAULTS['reset_on_handback'],
        'zero the LSTM state when a teleop takeover ends (applied: teleop -> policy or stop)',
    ),
}
PARAMETER_NAMES = tuple(PARAMETERS)
