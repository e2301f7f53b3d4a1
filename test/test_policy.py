"""The robot's Policy: parity with the sequence model on every backend, reset, threads, no TF.

Parity is the contract (DESIGN §2): stepped from reset, each backend reproduces the sequence
model's outputs on the same frames; the seed's own route (a stateful Keras model stepped one
frame at a time) agrees too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from modelfactory import TINY_CONVS, TINY_UNITS, make_tiny_bundle

from malpi_ros.errors import ConfigError
from malpi_ros.runtime import image
from malpi_ros.runtime.actions import ActionSelector
from malpi_ros.runtime.bundle import load_bundle
from malpi_ros.runtime.litert import LiteRTStep, auto_threads
from malpi_ros.runtime.policy import Policy, StepResult

FRAMES = 40
BACKENDS = ('litert', 'keras')


@pytest.fixture(scope='module')
def bundle_dir(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp('policy') / 'tiny', seed=1, dt=0.05)


@pytest.fixture(scope='module')
def frames() -> np.ndarray:
    """Camera-sized RGB frames (not the model size: step() must resize them)."""
    return np.random.default_rng(2).integers(0, 256, (FRAMES, 48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def sequence_model(bundle_dir) -> keras.Model:
    return keras.saving.load_model(bundle_dir / 'model.keras', safe_mode=True, compile=False)


@pytest.fixture(scope='module')
def expected(bundle_dir, sequence_model, frames) -> np.ndarray:
    """The sequence model's outputs over the whole sequence: (FRAMES, actions)."""
    cfg = load_bundle(bundle_dir).config.preprocess
    x = np.stack([image.preprocess(f, cfg) for f in frames])[np.newaxis]
    return np.asarray(sequence_model(x))[0]


def _run(policy: Policy, frames: np.ndarray) -> np.ndarray:
    return np.stack([policy.step(f).probabilities for f in frames])


@pytest.mark.parametrize('backend', BACKENDS)
def test_each_backend_reproduces_the_sequence_model(bundle_dir, frames, expected, backend):
    policy = Policy.from_bundle(bundle_dir, backend=backend)
    assert policy.backend == backend
    first = _run(policy, frames)
    assert np.max(np.abs(first - expected)) <= 1e-5
    assert policy.steps_since_reset == FRAMES
    # Without a reset the state carries on: the same frames give other outputs.
    carried = _run(policy, frames)
    assert np.max(np.abs(carried - first)) > 1e-3
    policy.reset()
    assert policy.steps_since_reset == 0
    h, c = policy.state
    assert not h.any() and not c.any()
    again = _run(policy, frames)
    if backend == 'keras':
        assert np.array_equal(again, first)
    else:
        assert np.max(np.abs(again - first)) <= 1e-6


def test_step_result_fields(bundle_dir, frames):
    policy = Policy.from_bundle(bundle_dir)
    assert policy.dt == 0.05
    assert policy.config == load_bundle(bundle_dir).config
    results = policy.step_many(frames[:3])
    assert [r.step for r in results] == [1, 2, 3]
    r = results[-1]
    assert isinstance(r, StepResult)
    assert r.probabilities.dtype == np.float32 and r.probabilities.shape == (5,)
    assert abs(float(r.probabilities.sum()) - 1.0) < 1e-5
    assert r.action == int(np.argmax(r.probabilities))
    assert r.action_name == policy.config.actions.names[r.action]
    assert 0 < r.inference_ms < 1000


def test_selector_is_used(bundle_dir, frames):
    policy = Policy.from_bundle(bundle_dir, selector=ActionSelector('epsilon_greedy', 1.0, 3))
    actions = {policy.step(f).action for f in frames}
    assert len(actions) > 1  # random actions, not always the argmax
    with pytest.raises(ConfigError, match="backend must be one of litert, keras, got 'tpu'"):
        Policy.from_bundle(bundle_dir, backend='tpu')


def test_step_times_split_the_inference_time(bundle_dir, frames):
    policy = Policy.from_bundle(bundle_dir)
    for r in policy.step_many(frames[:5]):
        t = r.times
        assert t.fit_ms > 0 and t.normalize_ms > 0 and t.model_ms > 0
        assert t.fit_ms + t.normalize_ms + t.model_ms <= r.inference_ms + 1e-3
    cfg = policy.config.preprocess
    fitted = policy.step_fitted(image.fit_frame(frames[0], cfg))
    assert fitted.times.fit_ms == 0 and fitted.times.normalize_ms > 0


def test_litert_run_with_fills_the_input_tensor_in_place_and_equals_run(bundle_dir, frames):
    b = load_bundle(bundle_dir)
    runtime = LiteRTStep(b.tflite_path, num_threads=1)
    x = image.preprocess(frames[0], b.config.preprocess)
    h = np.random.default_rng(0).random((1, runtime.units), dtype=np.float32)
    c = -h
    seen = []

    def fill(buffer):
        seen.append((buffer.shape, buffer.dtype, buffer.flags.writeable))
        image.preprocess(frames[0], b.config.preprocess, out=buffer)

    probs, h1, c1 = runtime.run_with(fill, h, c)
    assert seen == [(runtime.frame_shape, np.float32, True)]
    want = runtime.run(x[np.newaxis], h, c)
    for got, expected in zip((probs, h1, c1), want, strict=True):
        np.testing.assert_array_equal(got, expected)

    def bad(buffer):
        raise ValueError('a frame that cannot be used')

    with pytest.raises(ValueError, match='cannot be used'):
        runtime.run_with(bad, h, c)
    # The tensor view was released: the interpreter still runs (invoke() refuses otherwise).
    np.testing.assert_array_equal(runtime.run(x[np.newaxis], h, c)[0], want[0])
    # Results are copies: the next step does not change what the last one returned.
    kept = probs.copy()
    runtime.run_with(fill, h1, c1)
    np.testing.assert_array_equal(probs, kept)


def test_litert_threads_default_to_the_cores_less_one(bundle_dir):
    # One per core (2 on this CI machine, 4 on a Pi), at most 4.
    assert [auto_threads(n) for n in (1, 2, 4, 8, 64)] == [1, 2, 4, 4, 4]
    b = load_bundle(bundle_dir)
    assert LiteRTStep(b.tflite_path).num_threads == auto_threads()
    assert LiteRTStep(b.tflite_path, num_threads=2).num_threads == 2
    with pytest.raises(ConfigError, match=r'num_threads must be an integer >= 0 \(0 = auto\)'):
        LiteRTStep(b.tflite_path, num_threads=-1)


def _stateful_seed_model(sequence_model: keras.Model, cfg) -> keras.Model:
    """The seed's route: TimeDistributed convs, a stateful LSTM, batch_shape (1, 1, ...)."""
    m = cfg.model
    inputs = keras.Input(batch_shape=(1, 1, *m.input_shape))
    x = inputs
    for spec in TINY_CONVS:
        conv = keras.layers.Conv2D(
            spec.filters, spec.kernel, strides=spec.stride, activation='relu'
        )
        x = keras.layers.TimeDistributed(conv)(x)
    x = keras.layers.TimeDistributed(keras.layers.Flatten())(x)
    x = keras.layers.LSTM(TINY_UNITS, stateful=True, return_sequences=True)(x)
    outputs = keras.layers.Dense(m.num_actions, activation='softmax')(x)
    model = keras.Model(inputs, outputs)
    model.set_weights(sequence_model.get_weights())
    return model


def test_the_seed_stateful_route_agrees_with_our_step_runtimes(bundle_dir, sequence_model, frames):
    cfg = load_bundle(bundle_dir).config
    seed_model = _stateful_seed_model(sequence_model, cfg)
    x = np.stack([image.preprocess(f, cfg.preprocess) for f in frames[:15]])

    def run_seed() -> np.ndarray:
        return np.stack([np.asarray(seed_model(x[t][None, None]))[0, 0] for t in range(len(x))])

    def reset_seed() -> None:
        for layer in seed_model.layers:
            if hasattr(layer, 'reset_state'):
                layer.reset_state()

    seed_out = run_seed()
    for backend in BACKENDS:
        ours = _run(Policy.from_bundle(bundle_dir, backend=backend), frames[:15])
        assert np.max(np.abs(ours - seed_out)) <= 1e-5, backend
    assert np.max(np.abs(run_seed() - seed_out)) > 1e-3  # its state carried on...
    reset_seed()
    assert np.max(np.abs(run_seed() - seed_out)) <= 1e-6  # ...until reset_state()


def test_litert_process_never_imports_tensorflow(bundle_dir, tmp_path):
    script = f"""
import json, sys
import numpy as np
from malpi_ros.runtime import actions, image
from malpi_ros.runtime.policy import Policy
policy = Policy.from_bundle({str(bundle_dir)!r}, backend='litert')
result = policy.step(np.full((48, 64, 3), 128, np.uint8))
roots = {{name.split('.')[0] for name in sys.modules}}
print(json.dumps({{'step': result.step, 'action': result.action_name,
                  'tf': sorted(roots & {{'tensorflow', 'keras', 'tf_keras', 'tensorboard'}})}}))
"""
    # cwd outside the repo: the installed package, not the sources, is imported.
    out = subprocess.run(
        [sys.executable, '-c', script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report['step'] == 1
    assert report['action'] in load_bundle(bundle_dir).config.actions.names
    assert report['tf'] == []


class ResetMidStep:
    """A real LiteRT runtime that lets another party reset the policy during the model call."""

    name = 'litert'

    def __init__(self, runtime: LiteRTStep) -> None:
        self.runtime = runtime
        self.units = runtime.units
        self.policy: Policy | None = None

    def run_with(self, fill, h, c):
        out = self.runtime.run_with(fill, h, c)
        assert self.policy is not None
        self.policy.reset()
        return out


def test_a_reset_during_a_step_discards_that_step_from_the_state(bundle_dir, frames):
    b = load_bundle(bundle_dir)
    runtime = ResetMidStep(LiteRTStep(b.tflite_path))
    policy = Policy(runtime, b.config, dt=b.dt)
    runtime.policy = policy
    result = policy.step(frames[0])
    assert result.step == 1  # the step ran and its result is returned...
    h, c = policy.state
    assert not h.any() and not c.any()  # ...but the state is the reset's
    assert policy.steps_since_reset == 0


def test_reset_from_another_thread_leaves_the_state_whole(bundle_dir, frames):
    """Race step() against reset() many times: h and c always come from one legal state."""
    policy = Policy.from_bundle(bundle_dir, backend='litert', num_threads=1)
    warm, probe = frames[:3], frames[3]
    policy.step_many(warm)
    old = policy.state
    policy.step(probe)
    old_then_probe = policy.state
    policy.reset()
    policy.step(probe)
    zero_then_probe = policy.state
    zero = (np.zeros_like(old[0]), np.zeros_like(old[1]))
    candidates = [zero, zero_then_probe, old, old_then_probe]

    def which(state) -> int:
        """Index of the legal state (h, c) equals; -1 for none (e.g. h of one, c of another)."""
        for i, (h, c) in enumerate(candidates):
            if np.allclose(state[0], h, atol=1e-6) and np.allclose(state[1], c, atol=1e-6):
                return i
        return -1

    seen_during, seen_final = set(), []
    rng = np.random.default_rng(0)
    for _ in range(200):
        policy.reset()
        policy.step_many(warm)
        assert which(policy.state) == 2
        stop = threading.Event()

        def watch(stop=stop) -> None:
            while not stop.is_set():
                seen_during.add(which(policy.state))

        delay = float(rng.uniform(0, 2e-4))

        def reset_later(delay=delay) -> None:
            time.sleep(delay)
            policy.reset()

        threads = [threading.Thread(target=watch), threading.Thread(target=reset_later)]
        for t in threads:
            t.start()
        policy.step(probe)
        threads[1].join()
        stop.set()
        threads[0].join()
        seen_final.append(which(policy.state))
    # After a step and a reset, whatever their order: zero, or the probe stepped from zero
    # (never the probe stepped from the old state: that would be a lost reset).
    assert set(seen_final) <= {0, 1}, seen_final
    assert -1 not in seen_during, seen_during
    assert 0 in seen_during or 1 in seen_during  # the watcher did watch the race
