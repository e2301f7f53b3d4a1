"""The window kind of policy (the peers' way): every step re-runs the last K frames from a zero
state. Same builder, runtime and bundle format as the LSTM with its state carried; these tests
pin what it computes, what it costs, and that it trains and evaluates end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from bagfactory import synthetic_drive, write_bag
from modelfactory import tiny_config, tiny_sequence_model

from malpi_ros import cli
from malpi_ros.errors import BundleError, ConfigError
from malpi_ros.learn.evaluate import evaluate_bundle
from malpi_ros.learn.export import save_bundle
from malpi_ros.learn.sequence_runtime import SequenceModel
from malpi_ros.runtime.bundle import load_bundle
from malpi_ros.runtime.image import normalize
from malpi_ros.runtime.litert import LiteRTStep
from malpi_ros.runtime.policy import Policy

K = 3


@pytest.fixture(scope='module')
def window_bundle(tmp_path_factory):
    config = replace(tiny_config(), window=K)
    model = tiny_sequence_model(config, seed=2)
    path = tmp_path_factory.mktemp('window') / 'bundle'
    save_bundle(path, model, config, dt=0.1, seq_len=K, sources=[])
    return path


class Counting:
    """A step runtime that counts its calls (compute per frame, in model steps)."""

    def __init__(self, runtime):
        self.runtime, self.calls = runtime, 0
        self.name, self.units = runtime.name, runtime.units

    def run_with(self, fill, h, c):
        self.calls += 1
        return self.runtime.run_with(fill, h, c)


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 24, 32, 3), dtype=np.uint8)


def test_a_window_policy_gives_each_frame_the_output_of_its_last_k_frames(window_bundle):
    bundle = load_bundle(window_bundle)
    assert bundle.config.window == K and bundle.metadata['kind'] == 'window'
    counting = Counting(LiteRTStep(bundle.tflite_path, num_threads=1))
    policy = Policy(counting, bundle.config, dt=bundle.dt)
    clip = frames(9)
    got = np.stack([policy.step(f).probabilities for f in clip])
    reference = SequenceModel.from_file(bundle.keras_path, bundle.config.model)
    expected = reference.probabilities(clip, bundle.config.preprocess, window=K)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # ...which is not what the LSTM with its state carried gives on the same frames.
    carried = reference.probabilities(clip, bundle.config.preprocess)
    assert np.max(np.abs(carried[K:] - expected[K:])) > 1e-3
    # K model steps a frame once K frames are in: 1 + 2 + 3 * 7.
    assert counting.calls == 1 + 2 + K * (len(clip) - 2)
    # A reset forgets the window: the next frame is a sequence of one.
    policy.reset()
    alone = reference.probabilities(clip[4:5], bundle.config.preprocess)
    np.testing.assert_allclose(policy.step(clip[4]).probabilities, alone[0], atol=1e-5)


def test_the_window_reference_is_each_frames_window_run_as_a_sequence(window_bundle):
    bundle = load_bundle(window_bundle)
    reference = SequenceModel.from_file(bundle.keras_path, bundle.config.model)
    clip = frames(6, seed=1)
    pre = bundle.config.preprocess
    got = reference.probabilities(clip, pre, window=K)
    x = normalize(clip, pre)
    for i in range(len(clip)):
        window = x[max(0, i - K + 1) : i + 1][np.newaxis]
        np.testing.assert_allclose(got[i], np.asarray(reference.model(window))[0, -1], atol=1e-6)
    np.testing.assert_allclose(
        reference.probabilities(clip, pre, window=1),
        reference.probabilities(clip, pre, reset_every_frame=True),
    )


def test_a_bundle_whose_kind_disagrees_with_its_config_is_refused(window_bundle, tmp_path):
    meta = json.loads((window_bundle / 'metadata.json').read_text())
    meta['kind'] = 'lstm'
    copy = tmp_path / 'copy'
    copy.mkdir()
    for f in window_bundle.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"field kind: 'lstm' differs from config\.window 3"):
        load_bundle(copy)
    with pytest.raises(ConfigError, match='window must be an integer >= 0'):
        replace(tiny_config(), window=-1)


def test_train_window_trains_on_k_frame_windows_and_evaluates_with_parity(tmp_path, capsys):
    bags = []
    for i in range(3):
        drive = synthetic_drive(40, seed=i, start=1000.0 + 100 * i, height=24, width=32)
        bags.append(write_bag(tmp_path / f'd{i}', frames=drive.frames, commands=drive.commands))
    config = tmp_path / 'tiny.yaml'
    config.write_text(
        'model: {height: 24, width: 32, lstm_units: 8, convs: [\n'
        '  {filters: 4, kernel: 4, stride: 2}, {filters: 8, kernel: 3, stride: 2}]}\n'
        'train: {epochs: 1, batch_size: 8}\n'
    )
    out = tmp_path / 'bundle'
    args = ['train', *map(str, bags), '--out', str(out), '--config', str(config)]
    assert cli.main([*args, '--window', str(K), '--verbose', '0']) == 0
    assert f'window policy of {K} frames' in capsys.readouterr().out
    meta = load_bundle(out).metadata
    assert meta['kind'] == 'window' and meta['config']['window'] == K
    dataset = meta['extra']['dataset']
    assert (dataset['state'], dataset['burn_in'], dataset['seq_len'], dataset['stride']) == (
        'zero',
        K - 1,
        1,
        1,
    )
    report = evaluate_bundle(out, bags[:1], num_threads=1)
    assert report.parity is not None and report.parity.max_abs_diff < 1e-4
