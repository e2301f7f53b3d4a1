"""malpi-ros evaluate: a tiny random bundle over small synthetic bags, checked frame by frame.

The bag's frames are 48x64 and the bundle's input 24x32, so the cached (fitted) frames that
evaluate steps are not the decoded frames the robot steps: the test that compares the two
paths bit for bit has something to catch.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from bagfactory import mcap_file, synthetic_drive, write_bag
from modelfactory import make_tiny_bundle

from malpi_ros.bagio import reader as bagio
from malpi_ros.cli import main
from malpi_ros.config import DatasetConfig, to_dict
from malpi_ros.learn.evaluate import dataset_config_of, evaluate_bundle
from malpi_ros.runtime.bundle import load_bundle
from malpi_ros.runtime.image import decode
from malpi_ros.runtime.policy import Policy

EPISODES = (23, 17)  # frames per episode; a 5 s pause between them splits the bag


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('evaluate')
    bundle = make_tiny_bundle(root / 'bundle')
    drives = [
        synthetic_drive(n, start=1000.0 + 10.0 * k, height=48, width=64, seed=k)
        for k, n in enumerate(EPISODES)
    ]
    bag = write_bag(
        root / 'drive',
        frames=[f for d in drives for f in d.frames],
        commands=[c for d in drives for c in d.commands],
    )
    labels = np.concatenate([d.labels for d in drives])
    carried = evaluate_bundle(bundle, [bag])
    return {'root': root, 'bundle': bundle, 'bag': bag, 'labels': labels, 'carried': carried}


def test_counts_add_up_and_labels_are_the_recorded_ones(data):
    report = data['carried']
    assert report.backend == 'litert'
    assert [len(e) for e in report.episodes] == list(EPISODES)
    assert report.frames == sum(EPISODES)
    m = report.metrics
    assert m.matrix.sum() == m.total == report.frames
    np.testing.assert_array_equal(
        np.concatenate([e.labels for e in report.episodes]), data['labels']
    )
    np.testing.assert_array_equal(m.support, np.bincount(data['labels'], minlength=5))
    actions = np.concatenate([e.actions for e in report.episodes])
    np.testing.assert_array_equal(m.predicted, np.bincount(actions, minlength=5))
    assert m.accuracy == pytest.approx(np.mean(actions == data['labels']))
    # Frames in time order with their stamps; one record per frame.
    records = list(report.frame_records())
    assert len(records) == report.frames
    assert [r.episode for r in records] == [0] * EPISODES[0] + [1] * EPISODES[1]
    assert records[0].stamp == pytest.approx(1000.0)
    assert records[EPISODES[0]].stamp == pytest.approx(1010.0)
    assert all(b.stamp > a.stamp for a, b in itertools.pairwise(records))


def test_parity_with_the_sequence_model_is_tight(data):
    parity = data['carried'].parity
    assert parity is not None and parity.frames == sum(EPISODES)
    assert parity.max_abs_diff <= 1e-5
    assert parity.action_agreement == 1.0
    # ... and the check can fail: the sequence outputs of the other episode do not fit.
    ep0, ep1 = data['carried'].episodes
    n = min(len(ep0), len(ep1))
    assert np.abs(ep0.probabilities[:n] - ep1.sequence_probabilities[:n]).max() > 1e-3


def test_per_frame_results_equal_stepping_decoded_frames_by_hand(data):
    """The robot's way: decode each message, Policy.step it, reset at each episode start."""
    report = data['carried']
    policy = Policy.from_bundle(data['bundle'], backend='litert')
    with bagio.open_bag(data['bag']) as bag:
        decoded = [(t, decode(msg).copy()) for t, msg in bag.messages('/camera/image_raw')]
    assert decoded[0][1].shape == (48, 64, 3)  # not the model's 24x32: fit_frame does work
    frame_at = dict(decoded)
    for ep in report.episodes:
        policy.reset()
        for i, stamp in enumerate(ep.stamps):
            result = policy.step(frame_at[float(stamp)])
            np.testing.assert_array_equal(result.probabilities, ep.probabilities[i])
            assert result.action == ep.actions[i]


def test_reset_every_frame_changes_a_stateful_model(data):
    ablation = evaluate_bundle(data['bundle'], [data['bag']], reset_every_frame=True)
    carried = data['carried']
    assert ablation.reset_every_frame and ablation.frames == carried.frames
    for a, c in zip(ablation.episodes, carried.episodes, strict=True):
        # The first frame of an episode starts from zero either way ...
        np.testing.assert_allclose(a.probabilities[0], c.probabilities[0], atol=1e-6)
        # ... later frames see the carried state only in the normal run.
        assert np.abs(a.probabilities[1:] - c.probabilities[1:]).max() > 1e-2
    # The sequence model gives the same ablation (each frame a sequence of one).
    assert ablation.parity is not None and ablation.parity.max_abs_diff <= 1e-5


def test_litert_and_keras_backends_agree(data):
    keras_report = evaluate_bundle(data['bundle'], [data['bag']], backend='keras', parity=False)
    assert keras_report.backend == 'keras' and keras_report.parity is None
    litert = np.concatenate([e.probabilities for e in data['carried'].episodes])
    keras = np.concatenate([e.probabilities for e in keras_report.episodes])
    assert np.abs(litert - keras).max() <= 1e-5
    np.testing.assert_array_equal(
        np.concatenate([e.actions for e in keras_report.episodes]),
        np.concatenate([e.actions for e in data['carried'].episodes]),
    )


def test_cli_writes_report_json_and_png_and_prints_json(data, capsys):
    out = data['root'] / 'eval_out'
    code = main(['evaluate', str(data['bundle']), str(data['bag']), '--out', str(out), '--json'])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / 'report.json').read_text())
    assert printed['frames'] == written['frames'] == sum(EPISODES)
    assert written['backend'] == 'litert' and written['reset_every_frame'] is False
    assert written['parity']['max_abs_diff'] <= 1e-5
    per_class = written['metrics']['per_class']
    assert sum(c['support'] for c in per_class.values()) == sum(EPISODES)
    ep = written['episodes'][0]
    assert len(ep['stamps']) == len(ep['labels']) == len(ep['actions']) == EPISODES[0]
    np.testing.assert_array_equal(
        np.asarray(ep['probabilities'], np.float32), data['carried'].episodes[0].probabilities
    )
    assert (out / 'confusion.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'precision' in (out / 'report.txt').read_text()


def test_cli_text_report_is_readable(data, capsys):
    code = main(['evaluate', str(data['bundle']), str(data['bag']), '--no-parity'])
    assert code == 0
    text = capsys.readouterr().out
    assert 'litert runtime, state carried through each episode' in text
    assert 'confusion matrix (rows: human label, columns: policy action):' in text
    assert 'parity with the sequence model: not checked' in text
    for name in ('stop', 'forward', 'left', 'right', 'backward'):
        assert name in text
    assert 'accuracy by frames since the last reset (all frames):' in text
    assert '1-20: ' in text and '201+: ' in text


def test_cli_reports_memory_on_the_focus_actions_and_refuses_unknown_ones(data, capsys):
    assert main(['evaluate', str(data['bundle']), str(data['bag']), '--no-parity',
                 '--focus', 'left', 'right']) == 0  # fmt: skip
    assert (
        'accuracy by frames since the last reset (left, right frames):' in capsys.readouterr().out
    )
    assert main(['evaluate', str(data['bundle']), str(data['bag']), '--no-parity',
                 '--focus', 'sideways']) == 1  # fmt: skip
    assert "focus actions ['sideways'] are not in the action table" in capsys.readouterr().err


def test_bad_bags_are_clear_errors(data, capsys, tmp_path):
    no_images = write_bag(
        tmp_path / 'no_images', image_topic=None, commands=[(1.0, 0.3, 0.0), (1.1, 0.3, 0.0)]
    )
    code = main(['evaluate', str(data['bundle']), str(no_images), '--no-parity'])
    err = capsys.readouterr().err
    assert code == 1
    assert f'bag {no_images}: no image topic' in err and '/cmd_vel' in err

    broken = write_bag(tmp_path / 'broken', **_small_drive())
    storage = mcap_file(broken)
    storage.write_bytes(storage.read_bytes()[: storage.stat().st_size // 2])
    code = main(['evaluate', str(data['bundle']), str(broken), '--no-parity'])
    assert code == 1
    assert f'bag {broken}' in capsys.readouterr().err

    code = main(['evaluate', str(tmp_path / 'no_bundle'), str(data['bag'])])
    assert code == 1
    assert 'no_bundle' in capsys.readouterr().err


def test_labelling_rules_come_from_the_bundle_metadata(data):
    bundle = load_bundle(data['bundle'])
    assert dataset_config_of(bundle) == DatasetConfig()  # the tiny bundle stores none
    rules = DatasetConfig(lag=0.05, cmd_timeout=0.3, gap=2.0)
    stored = replace(bundle, metadata={**bundle.metadata, 'extra': {'dataset': to_dict(rules)}})
    assert dataset_config_of(stored) == rules


def _small_drive() -> dict:
    drive = synthetic_drive(20, height=24, width=32)
    return {'frames': drive.frames, 'commands': drive.commands}


def test_cached_frames_step_like_decoded_frames_for_a_cropping_bundle(data):
    """A crop makes fit_frame non-idempotent: stepping a cached (cropped, resized) frame with
    Policy.step would crop it twice; Policy.step_fitted gives what step gives on the raw frame."""
    from malpi_ros.runtime.image import fit_frame
    from malpi_ros.runtime.litert import LiteRTStep

    bundle = load_bundle(data['bundle'])
    cropped = replace(bundle.config, preprocess=replace(bundle.config.preprocess, crop_top=0.25))
    runtime = LiteRTStep(bundle.tflite_path)
    policy = Policy(runtime, cropped, dt=bundle.dt)
    frames = [f for _, f in synthetic_drive(6, height=48, width=64).frames]
    by_hand = Policy(LiteRTStep(bundle.tflite_path), cropped, dt=bundle.dt)
    for frame in frames:
        got = policy.step_fitted(fit_frame(frame, cropped.preprocess))
        want = by_hand.step(frame)
        np.testing.assert_array_equal(got.probabilities, want.probabilities)


def test_litert_without_parity_never_imports_tensorflow(data):
    code = (
        'import sys\n'
        'from malpi_ros.learn.evaluate import evaluate_bundle\n'
        f'r = evaluate_bundle({str(data["bundle"])!r}, [{str(data["bag"])!r}], parity=False)\n'
        'assert r.frames > 0\n'
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '[]'


def test_accuracy_by_frames_since_reset_buckets_each_frame_by_its_distance_from_the_reset():
    from malpi_ros.learn.evaluate import EpisodeResult, accuracy_since_reset

    def episode(labels: list[int], actions: list[int]) -> EpisodeResult:
        n = len(labels)
        return EpisodeResult(
            index=0,
            bag='b',
            bag_episode=0,
            stamps=np.arange(n) * 0.1,
            labels=np.asarray(labels),
            actions=np.asarray(actions),
            probabilities=np.zeros((n, 5), np.float32),
            sequence_probabilities=None,
            step_ms=np.zeros(n),
        )

    # 250 frames: right on frames 1-20, wrong on 21-50, right on 51-200 except the turns (label
    # 2), wrong after 200. A second, short episode restarts the count at 1.
    labels = [1] * 250
    actions = [1] * 20 + [0] * 30 + [1] * 150 + [0] * 50
    for i in (60, 70, 80):
        labels[i] = 2
    long, short = episode(labels, actions), episode([1, 1, 2], [1, 1, 2])
    buckets = accuracy_since_reset([long, short], reset_every_frame=False)
    assert [b.name for b in buckets] == ['1-20', '21-50', '51-200', '201+']
    assert [b.frames for b in buckets] == [23, 30, 150, 50]
    assert [b.accuracy for b in buckets] == [1.0, 0.0, 147 / 150, 0.0]
    turns = accuracy_since_reset([long, short], reset_every_frame=False, focus=[2])
    assert [(b.correct, b.frames) for b in turns] == [(1, 1), (0, 0), (0, 3), (0, 0)]
    assert turns[1].accuracy is None
    # Reset every frame: every frame is one step after a reset.
    ablation = accuracy_since_reset([long, short], reset_every_frame=True)
    assert [b.frames for b in ablation] == [253, 0, 0, 0]
