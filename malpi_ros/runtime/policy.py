"""The policy as the robot runs it: one frame in, one action out, the LSTM state kept between.

(A bundle of the window kind, ``PolicyConfig.window`` K > 0, instead re-runs its last K frames
from a zero state every step: the peers' way, kept for comparison.)

``Policy.step(rgb)`` applies the bundle's own preprocessing (so no caller can feed the model
differently from training), runs the step model on the frame and the held state ``(h, c)``,
keeps the new state and picks an action. ``reset()`` zeroes the state (a new drive).

Backends (``litert`` for the robot, ``keras`` for checks) are imported only when chosen: the
LiteRT path must not import TensorFlow (DESIGN §2). ``precision`` picks the bundle's LiteRT step
model: ``fp32`` (every bundle) or ``int8`` (added by ``malpi-ros export BUNDLE --int8``).

Threads: ``step`` calls are serialized (a runtime is one set of tensors). ``reset`` may come
from another thread at any time (a ROS service) and never waits for a model call. The state is
swapped under a lock, whole, so it is always fully old or fully zero, never h of one and c of
the other. A reset that arrives *during* a step wins: that step's result is returned to its
caller but discarded from the state, which stays zero; the next step starts from zero.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from malpi_ros.config import PolicyConfig
from malpi_ros.errors import BundleError, ConfigError
from malpi_ros.runtime import image
from malpi_ros.runtime.actions import ActionSelector
from malpi_ros.runtime.bundle import Bundle, check_precision, load_bundle

if TYPE_CHECKING:
    from malpi_ros.runtime.litert import LiteRTStep

BACKENDS = ('litert', 'keras')


class StepRuntime(Protocol):
    """What a backend provides: one batch-1 step with explicit state."""

    name: str
    units: int

    def run(
        self, frame: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def run_with(
        self, fill: Callable[[np.ndarray], object], h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class StepTimes:
    """Where one step's time went: the ``time.perf_counter_ns`` marks of its stages, kept as
    marks so ``policy_node`` can stamp them (``runtime.latency``) without timing anything twice.

    ``fit`` (crop + resize, ``image.fit_frame``; 0 for ``step_fitted``), ``normalize`` (written
    into the runtime's input) and ``model`` (the runtime call: state in, invoke, outputs out).
    """

    start_ns: int
    fitted_ns: int
    normalized_ns: int
    end_ns: int

    @property
    def fit_ms(self) -> float:
        return (self.fitted_ns - self.start_ns) * 1e-6

    @property
    def normalize_ms(self) -> float:
        return (self.normalized_ns - self.fitted_ns) * 1e-6

    @property
    def model_ms(self) -> float:
        return (self.end_ns - self.normalized_ns) * 1e-6


@dataclass(frozen=True)
class StepResult:
    """What one step gave: probabilities (float32, one per action) and the action chosen.

    ``step`` counts steps since the last reset, 1 for the first. ``inference_ms`` is the time of
    preprocessing plus the model call; ``times`` splits it.
    """

    probabilities: np.ndarray
    action: int
    action_name: str
    step: int
    inference_ms: float
    times: StepTimes


class Policy:
    """A conv+LSTM policy stepped one frame at a time, with its LSTM state held explicitly."""

    def __init__(
        self,
        runtime: StepRuntime,
        config: PolicyConfig,
        *,
        dt: float,
        selector: ActionSelector | None = None,
        bundle: Bundle | None = None,
        precision: str = 'fp32',
    ) -> None:
        if runtime.units != config.model.lstm_units:
            raise ConfigError(
                f'runtime has {runtime.units} LSTM units, the config {config.model.lstm_units}'
            )
        self._runtime = runtime
        self._config = config
        self.precision = precision  # which of the bundle's step models the runtime runs
        self._dt = float(dt)
        # A new selector per policy: a shared default instance would share its random state.
        self._selector = selector if selector is not None else ActionSelector('argmax')
        self.bundle = bundle
        self._names = config.actions.names
        self._step_lock = threading.Lock()  # one model call at a time
        self._state_lock = threading.Lock()  # guards h, c, the step count and the generation
        self._generation = 0
        self._steps = 0
        self._h, self._c = self._zero_state()
        # A window policy (config.window K > 0) keeps its last K fitted frames (uint8) instead
        # of a state, and re-runs them from a zero state every step.
        self._recent: deque[np.ndarray] = deque(maxlen=max(config.window, 1))

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        backend: str = 'litert',
        num_threads: int = 0,
        selector: ActionSelector | None = None,
        precision: str = 'fp32',
    ) -> Policy:
        """Load a bundle (checked, see ``load_bundle``) and run it on ``backend``.

        ``num_threads``: LiteRT interpreter threads; 0 derives them from the cores
        (``runtime_litert.auto_threads``). ``precision``: ``fp32`` or ``int8`` (LiteRT only; a
        bundle without an int8 step model is refused, naming the file and the export command).
        """
        if backend not in BACKENDS:
            raise ConfigError(f'backend must be one of {", ".join(BACKENDS)}, got {backend!r}')
        if check_precision(precision) != 'fp32' and backend != 'litert':
            raise ConfigError(f'precision {precision} runs on the litert backend, not {backend}')
        bundle = load_bundle(path)
        runtime: StepRuntime
        if backend == 'litert':
            from malpi_ros.runtime.litert import LiteRTStep

            step_path = bundle.step_path(precision)
            runtime = LiteRTStep(step_path, num_threads=num_threads)
            _check_runtime(runtime, bundle.config, step_path)
        else:
            from malpi_ros.learn.keras_step import KerasStep  # TensorFlow: only when asked for

            runtime = KerasStep.from_file(bundle.keras_path, bundle.config.model)
        return cls(
            runtime,
            bundle.config,
            dt=bundle.dt,
            selector=selector,
            bundle=bundle,
            precision=precision,
        )

    @property
    def config(self) -> PolicyConfig:
        return self._config

    @property
    def dt(self) -> float:
        """The frame period (s) the policy was trained at; step it at this rate."""
        return self._dt

    @property
    def backend(self) -> str:
        return self._runtime.name

    @property
    def steps_since_reset(self) -> int:
        with self._state_lock:
            return self._steps

    @property
    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (h, c), each (1, units), read together."""
        with self._state_lock:
            return self._h.copy(), self._c.copy()

    def _zero_state(self) -> tuple[np.ndarray, np.ndarray]:
        units = self._config.model.lstm_units
        return np.zeros((1, units), np.float32), np.zeros((1, units), np.float32)

    def reset(self) -> None:
        """Zero the LSTM state: the next step starts a new sequence. Safe from any thread."""
        h, c = self._zero_state()
        with self._state_lock:
            self._h, self._c = h, c
            self._steps = 0
            self._generation += 1
            self._recent.clear()

    def step(self, rgb: np.ndarray) -> StepResult:
        """Preprocess an RGB uint8 frame (any size), run one step, keep the state, pick."""
        start = time.perf_counter_ns()
        # image.preprocess, in its two parts: fit here, normalize into the runtime's input.
        fitted = image.fit_frame(rgb, self._config.preprocess)
        return self._step(fitted, start, time.perf_counter_ns())

    def step_fitted(self, fitted: np.ndarray) -> StepResult:
        """Step on a frame already cropped and resized by ``image.fit_frame`` (cached training
        frames): only ``image.normalize`` remains, so the input equals ``step``'s bit for bit."""
        start = time.perf_counter_ns()
        return self._step(fitted, start, start)

    def _filler(
        self, fitted: np.ndarray, stamp: list[int] | None = None
    ) -> Callable[[np.ndarray], None]:
        """Normalize ``fitted`` straight into the runtime's input buffer; ``stamp[0]`` gets the
        time it finished (for ``StepTimes``)."""

        def fill(buffer: np.ndarray) -> None:
            image.normalize(fitted, self._config.preprocess, out=buffer)
            if stamp is not None:
                stamp[0] = time.perf_counter_ns()

        return fill

    def _step(self, fitted: np.ndarray, start: int, fitted_at: int) -> StepResult:
        normalized_at = [0]
        with self._step_lock:
            with self._state_lock:
                h, c, generation, steps = self._h, self._c, self._generation, self._steps
                if self._config.window:
                    self._recent.append(fitted.copy())  # the caller may reuse its buffer
                    recent = list(self._recent)
            # Outside the state lock: a reset never waits for the model. Arrays are never
            # written in place (run_with() returns new ones), so h and c stay as read.
            if self._config.window:
                # DonkeyCar's way: the last K frames again, from a zero state, every step (the
                # oldest frame's normalization is the step's; the rest counts as model time).
                h_run, c_run = self._zero_state()
                for i, past in enumerate(recent):
                    fill = self._filler(past, normalized_at if i == 0 else None)
                    probs, h_run, c_run = self._runtime.run_with(fill, h_run, c_run)
                h_next, c_next = self._zero_state()  # nothing is carried to the next step
            else:
                fill = self._filler(fitted, normalized_at)
                probs, h_next, c_next = self._runtime.run_with(fill, h, c)
            with self._state_lock:
                if self._generation == generation:
                    self._h, self._c = h_next, c_next
                    self._steps = steps + 1
            end = time.perf_counter_ns()
            probs = np.asarray(probs, np.float32)
            action = self._selector.select(probs)
        return StepResult(
            probabilities=probs,
            action=action,
            action_name=self._names[action],
            step=steps + 1,
            inference_ms=(end - start) * 1e-6,
            times=StepTimes(start, fitted_at, normalized_at[0], end),
        )

    def step_many(self, frames: Iterable[np.ndarray]) -> list[StepResult]:
        """Step through frames in order (state carried), e.g. an episode read from a bag."""
        return [self.step(frame) for frame in frames]


def _check_runtime(runtime: LiteRTStep, config: PolicyConfig, path: Path) -> None:
    """A step model whose shapes are not the bundle config's (a file from another bundle with
    its checksum edited in, say) stops start-up naming the file, before any frame is stepped."""
    m = config.model
    found = (tuple(runtime.frame_shape), runtime.units, runtime.num_actions)
    want = (m.input_shape, m.lstm_units, m.num_actions)
    if found != want:
        raise BundleError(
            f'{path}: step model has (frame, units, actions) {found}, the bundle config {want}'
        )
