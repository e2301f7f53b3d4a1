"""Configuration of the model, its preprocessing, the action table, the dataset and training.

Frozen dataclasses, checked in ``__post_init__`` so a bad value fails where it is written, with
a message that says what was received. They round-trip through plain dicts (``to_dict`` /
``from_dict``) because the bundle's metadata JSON and the YAML config files carry them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from malpi_ros.checks import flag, int_at_least, is_number, non_negative, one_of, positive
from malpi_ros.errors import ConfigError

T = TypeVar('T')

NORMALIZATIONS = ('unit', 'standardize')
ACTIVATIONS = ('relu', 'tanh', 'elu', 'linear', 'sigmoid')
TRAINING_STATES = ('carried', 'zero')
# How fit spreads over devices and machines (README "Training on several machines").
DISTRIBUTE_MODES = ('none', 'mirrored', 'multi-worker')


@dataclass(frozen=True)
class ConvSpec:
    """One Conv2D layer: ``filters`` kernels of ``kernel``x``kernel`` at ``stride``."""

    filters: int
    kernel: int
    stride: int

    def __post_init__(self) -> None:
        int_at_least('conv filters', self.filters, 1)
        int_at_least('conv kernel', self.kernel, 1)
        int_at_least('conv stride', self.stride, 1)


# The MaLPi model of the 2017 write-up: Conv 16@8x8/4, 32@4x4/2, 64@3x3/1.
MALPI_CONVS = (ConvSpec(16, 8, 4), ConvSpec(32, 4, 2), ConvSpec(64, 3, 1))


@dataclass(frozen=True)
class ModelConfig:
    """The conv+LSTM policy: input shape, conv stack, LSTM, and the number of actions."""

    height: int = 120
    width: int = 120
    channels: int = 3
    convs: tuple[ConvSpec, ...] = MALPI_CONVS
    conv_activation: str = 'relu'
    lstm_units: int = 128
    # tanh, not the seed's relu: DESIGN §4 (the relu LSTM never learned the cue task).
    lstm_activation: str = 'tanh'
    num_actions: int = 5

    def __post_init__(self) -> None:
        int_at_least('height', self.height, 1)
        int_at_least('width', self.width, 1)
        if self.channels not in (1, 3):
            raise ConfigError(f'channels must be 1 or 3, got {self.channels!r}')
        convs = tuple(c if isinstance(c, ConvSpec) else ConvSpec(**c) for c in self.convs)
        object.__setattr__(self, 'convs', convs)
        one_of('conv_activation', self.conv_activation, ACTIVATIONS)
        one_of('lstm_activation', self.lstm_activation, ACTIVATIONS)
        int_at_least('lstm_units', self.lstm_units, 1)
        int_at_least('num_actions', self.num_actions, 2)
        h, w = self.height, self.width
        for i, conv in enumerate(convs):
            h, w = (h - conv.kernel) // conv.stride + 1, (w - conv.kernel) // conv.stride + 1
            if h < 1 or w < 1:
                raise ConfigError(
                    f'conv {i} ({conv.filters}@{conv.kernel}x{conv.kernel}/{conv.stride}) leaves '
                    f'no pixels of a {self.height}x{self.width} input'
                )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded RGB uint8 frame becomes model input; the same for training and robot.

    The crop is given as fractions of the source frame (so it means the same at any camera
    resolution) and is applied before the resize to ``height`` x ``width``.
    """

    height: int = 120
    width: int = 120
    channels: int = 3
    crop_top: float = 0.0
    crop_bottom: float = 0.0
    crop_left: float = 0.0
    crop_right: float = 0.0
    # Per-frame, per-channel standardization (what MaLPi did): the memory recipe learns the cue
    # far more reliably with it than with [0, 1] scaling (README, "The memory recipe").
    normalization: str = 'standardize'

    def __post_init__(self) -> None:
        int_at_least('preprocess height', self.height, 1)
        int_at_least('preprocess width', self.width, 1)
        if self.channels not in (1, 3):
            raise ConfigError(f'preprocess channels must be 1 or 3, got {self.channels!r}')
        for name in ('crop_top', 'crop_bottom', 'crop_left', 'crop_right'):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
                raise ConfigError(f'{name} must be a fraction in [0, 1), got {value!r}')
        if self.crop_top + self.crop_bottom >= 1.0 or self.crop_left + self.crop_right >= 1.0:
            raise ConfigError(
                'crop leaves nothing of the frame: '
                f'top+bottom={self.crop_top + self.crop_bottom}, '
                f'left+right={self.crop_left + self.crop_right}'
            )
        one_of('normalization', self.normalization, NORMALIZATIONS)


@dataclass(frozen=True)
class Action:
    """One discrete action and the command it stands for (m/s, rad/s)."""

    name: str
    linear_x: float
    angular_z: float

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f'action name must be a non-empty string, got {self.name!r}')
        for attr in ('linear_x', 'angular_z'):
            value = getattr(self, attr)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise ConfigError(f'action {self.name}: {attr} must be finite, got {value!r}')


MALPI_ACTIONS = (
    Action('stop', 0.0, 0.0),
    Action('forward', 0.3, 0.0),
    Action('left', 0.2, 1.0),
    Action('right', 0.2, -1.0),
    Action('backward', -0.2, 0.0),
)


@dataclass(frozen=True)
class ActionTable:
    """The policy's discrete actions and how recorded commands map onto them.

    Commands are compared in a normalized space (linear / ``max_linear``, angular /
    ``max_angular``); a command whose normalized length is below ``dead_zone`` is "no command"
    and maps to the action named ``stop_action``.
    """

    actions: tuple[Action, ...] = MALPI_ACTIONS
    max_linear: float = 0.3
    max_angular: float = 1.0
    dead_zone: float = 0.1
    stop_action: str = 'stop'

    def __post_init__(self) -> None:
        actions = tuple(a if isinstance(a, Action) else Action(**a) for a in self.actions)
        object.__setattr__(self, 'actions', actions)
        if len(actions) < 2:
            raise ConfigError(f'the action table needs at least 2 actions, got {len(actions)}')
        names = [a.name for a in actions]
        if len(set(names)) != len(names):
            raise ConfigError(f'action names must be unique, got {names}')
        if self.stop_action not in names:
            raise ConfigError(f'stop_action {self.stop_action!r} is not an action in {names}')
        positive('max_linear', self.max_linear)
        positive('max_angular', self.max_angular)
        non_negative('dead_zone', self.dead_zone)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.actions)

    @property
    def stop_index(self) -> int:
        return self.names.index(self.stop_action)

    def __len__(self) -> int:
        return len(self.actions)


@dataclass(frozen=True)
class DatasetConfig:
    """How recordings become labelled episodes and training windows (DESIGN §4).

    ``lag``: a frame is labelled with the latest command at or before ``stamp + lag``.
    ``cmd_timeout``: a frame whose latest command is older than this is ``stale``; it is
    labelled ``stop`` (``stale='stop'``) or dropped (``stale='drop'``).
    ``gap``: a pause between frames longer than this starts a new episode.
    ``state``: how training treats the LSTM state (README "The memory recipe"):
      ``carried`` (default): each episode is cut into consecutive chunks of ``seq_len`` frames
      and the state at the end of one chunk starts the next (truncated backpropagation through
      time), so training visits the states the robot reaches after minutes of driving;
      ``zero``: independent windows of ``burn_in + seq_len`` frames, each from a zero state,
      started every ``stride`` frames (the seed's recipe; memory holds only within a window's
      length of a reset, DESIGN §4).
    ``seq_len``: frames per chunk (``carried``) or scored frames per window (``zero``); the
    gradient reaches back at most this far, so it should be about twice the distance from a
    cue to the decision that needs it.
    ``burn_in``: the first ``burn_in`` steps after a zero state carry no loss, so the state is
    warmed up before it is judged (in ``zero`` a window is ``burn_in + seq_len`` frames long).
    ``bptt`` (``zero`` only): the gradient flows through a window's last ``bptt`` frames; the
    frames before run forward only, their final state held constant for the rest (R2D2's
    burn-in). The outputs and the loss are the window's own; the backward pass, two thirds of
    a step's compute, covers ``bptt`` frames instead of the window. 0, or at least the window:
    the whole window. It must reach back from the decisions to their cue (>= ``seq_len``).
    """

    lag: float = 0.0
    cmd_timeout: float = 0.5
    stale: str = 'stop'
    gap: float = 1.0
    state: str = 'carried'
    seq_len: int = 32
    stride: int = 5
    burn_in: int = 10
    bptt: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.lag, int | float) and math.isfinite(self.lag)):
            raise ConfigError(f'lag must be a finite number of seconds, got {self.lag!r}')
        positive('cmd_timeout', self.cmd_timeout)
        one_of('stale', self.stale, ('stop', 'drop'))
        positive('gap', self.gap)
        one_of('state', self.state, TRAINING_STATES)
        int_at_least('seq_len', self.seq_len, 1)
        int_at_least('stride', self.stride, 1)
        int_at_least('burn_in', self.burn_in, 0)
        int_at_least('bptt', self.bptt, 0)
        if self.bptt and self.state != 'zero':
            raise ConfigError(
                f'bptt truncates zero-state windows (state: zero); with state {self.state!r} '
                f'the gradient already stops at chunk boundaries: got bptt={self.bptt}'
            )
        if self.bptt and self.bptt < self.seq_len:
            raise ConfigError(
                f'bptt must be 0 (the whole window) or at least seq_len ({self.seq_len}): the '
                f'scored frames need their gradient; got {self.bptt}'
            )

    @property
    def window(self) -> int:
        """Frames of one training window (``zero``)."""
        return self.burn_in + self.seq_len

    @property
    def drive_frames(self) -> int:
        """The longest drive training keeps in one gradient: a window (``zero``) or a chunk
        (``carried``; a longer episode is cut into chunks, and no gradient crosses a cut)."""
        return self.window if self.state == 'zero' else self.seq_len

    @property
    def forward_only(self) -> int:
        """Frames at the start of a training window that run without gradient (``bptt``)."""
        return max(0, self.window - self.bptt) if self.bptt else 0

    @property
    def min_frames(self) -> int:
        """The shortest episode training can use: one window (``zero``), or one scored step
        after the burn-in (``carried``)."""
        return self.window if self.state == 'zero' else self.burn_in + 1

    @property
    def unit(self) -> str:
        """What training cuts episodes into, for messages: 'windows of N frames' or 'chunks of
        N frames'."""
        if self.state == 'zero':
            return f'windows of {self.window} frames'
        return f'chunks of {self.seq_len} frames'


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings; defaults are the recipe the memory tests pass with (DESIGN §4)."""

    epochs: int = 30
    batch_size: int = 8
    learning_rate: float = 3e-4
    val_fraction: float = 0.2
    seed: int = 0
    patience: int = 10
    # Early stopping never acts before this epoch: learning to remember starts on a plateau.
    min_epochs: int = 10
    class_weighting: bool = True
    # Stop after the first epoch whose validation accuracy (scored steps) reaches this, even
    # before min_epochs: "good enough" is known in advance where the scored steps are the
    # decisions that need memory (the simulator's drives end at the fork). None: every epoch,
    # with early stopping on val_loss.
    target_val_accuracy: float | None = None
    # Rare actions weigh more, but at most this many times the commonest.
    class_weight_cap: float = 10.0
    # none: one process, its default device; mirrored: tf.distribute.MirroredStrategy over
    # this machine's GPUs; multi-worker: MultiWorkerMirroredStrategy over the machines named
    # in TF_CONFIG. batch_size stays the global batch (summed over replicas) in every mode.
    distribute: str = 'none'
    # XLA-compile the training step where a GPU is present; off on a CPU (train says so).
    xla: bool = False
    # Loss factor of frames labelled from a teleop takeover (a recording with the driver's
    # ~/applied); 1: like any frame. Higher: the corrections of the policy's own mistakes count
    # more than the frames it drove itself (issue 13).
    intervention_weight: float = 1.0
    # Normalize every frame once per run, held as float32, when that copy takes at most this
    # many GiB (and half the memory the machine has available); else each batch normalizes
    # its own frames. The same numbers either way; 0: always per batch.
    normalized_frames_gib: float = 4.0

    def __post_init__(self) -> None:
        int_at_least('epochs', self.epochs, 1)
        if not (is_number(self.normalized_frames_gib) and self.normalized_frames_gib >= 0):
            raise ConfigError(
                f'normalized_frames_gib must be a number >= 0, got {self.normalized_frames_gib!r}'
            )
        if not (is_number(self.intervention_weight) and self.intervention_weight >= 0):
            raise ConfigError(
                f'intervention_weight must be a number >= 0, got {self.intervention_weight!r}'
            )
        int_at_least('min_epochs', self.min_epochs, 0)
        flag('class_weighting', self.class_weighting)
        target = self.target_val_accuracy
        if target is not None and not (is_number(target) and 0.0 < target <= 1.0):
            raise ConfigError(
                f'target_val_accuracy must be a number in (0, 1] or null, got {target!r}'
            )
        if not (is_number(self.class_weight_cap) and self.class_weight_cap >= 1):
            raise ConfigError(f'class_weight_cap must be >= 1, got {self.class_weight_cap!r}')
        int_at_least('batch_size', self.batch_size, 1)
        positive('learning_rate', self.learning_rate)
        if not (isinstance(self.val_fraction, int | float) and 0.0 <= self.val_fraction < 1.0):
            raise ConfigError(f'val_fraction must be in [0, 1), got {self.val_fraction!r}')
        int_at_least('seed', self.seed, 0)
        int_at_least('patience', self.patience, 1)
        one_of('distribute', self.distribute, DISTRIBUTE_MODES)
        flag('xla', self.xla)


@dataclass(frozen=True)
class PolicyConfig:
    """Everything that fixes how frames become actions: kept together in the bundle.

    ``window``: 0 (the default) runs the LSTM one step per frame with its state carried; ``K``
    >= 1 makes a window policy, the way DonkeyCar runs its recurrent models: every step re-runs
    the model over the last ``K`` frames from a zero state (``K`` steps of compute per frame,
    no memory beyond ``K`` frames). Kept as a kind of the same policy (one builder, one
    runtime, one bundle format) so the two are compared on equal terms.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    actions: ActionTable = field(default_factory=ActionTable)
    window: int = 0

    @property
    def kind(self) -> str:
        """'lstm' (state carried) or 'window' (the last ``window`` frames re-run each step)."""
        return 'window' if self.window else 'lstm'

    def __post_init__(self) -> None:
        int_at_least('window', self.window, 0)
        m, p = self.model, self.preprocess
        if (p.height, p.width, p.channels) != (m.height, m.width, m.channels):
            raise ConfigError(
                f'preprocess output {p.height}x{p.width}x{p.channels} does not match the model '
                f'input {m.height}x{m.width}x{m.channels}'
            )
        if m.num_actions != len(self.actions):
            raise ConfigError(
                f'model has {m.num_actions} outputs but the action table has '
                f'{len(self.actions)} actions ({", ".join(self.actions.names)})'
            )

    @classmethod
    def sized(
        cls, height: int, width: int, channels: int = 3, **model_overrides: Any
    ) -> PolicyConfig:
        """A consistent config for another input size (tests, the simulator)."""
        actions = model_overrides.pop('actions', ActionTable())
        normalization = model_overrides.pop('normalization', 'unit')
        return cls(
            model=ModelConfig(
                height=height,
                width=width,
                channels=channels,
                num_actions=len(actions),
                **model_overrides,
            ),
            preprocess=PreprocessConfig(
                height=height, width=width, channels=channels, normalization=normalization
            ),
            actions=actions,
        )


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of any config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass from a dict, nested configs included; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f'{cls.__name__} must be a mapping, got {type(data).__name__}')
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f'{cls.__name__}: unknown keys {unknown}; known: {sorted(fields)}')
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        nested = _NESTED.get((cls.__name__, name))
        if nested is not None:
            kwargs[name] = from_dict(nested, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f'{cls.__name__}: {err}') from err


_NESTED: dict[tuple[str, str], type] = {
    ('PolicyConfig', 'model'): ModelConfig,
    ('PolicyConfig', 'preprocess'): PreprocessConfig,
    ('PolicyConfig', 'actions'): ActionTable,
}
