"""malpi-ros export BUNDLE --int8: the quantized step model, its metadata, and the checks on it.

A tiny random bundle that lists a real synthetic recording (4 episodes, one held out by the
training split) as its training data, so the export reads its own recordings as it would for a
trained bundle. The agreement stored in the metadata is re-measured here by hand.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from bagfactory import synthetic_drive, write_bag
from modelfactory import make_tiny_bundle

from malpi_ros.bagio import reader as bagio
from malpi_ros.cli import main
from malpi_ros.config import DatasetConfig
from malpi_ros.errors import BundleError, ConfigError
from malpi_ros.learn.dataset import load_recordings, split_by_episode
from malpi_ros.runtime.bundle import (
    INT8_FILE,
    METADATA_FILE,
    add_model_file,
    load_bundle,
    metadata_digest,
    write_json,
)
from malpi_ros.runtime.policy import Policy

EPISODES = (40, 35, 30, 45)  # frames; 10 s pauses split the bag into these episodes
# What `malpi-ros train` stores in extra.train: its TrainConfig and the recipe's clipnorm. The
# split is training's: val_fraction and seed from here, not the defaults.
TRAIN = {'val_fraction': 0.3, 'seed': 5}


def _drive_bag(path, seed=0):
    drives = [
        synthetic_drive(n, start=1000.0 + 20.0 * k, height=48, width=64, seed=seed + k)
        for k, n in enumerate(EPISODES)
    ]
    return write_bag(
        path,
        frames=[f for d in drives for f in d.frames],
        commands=[c for d in drives for c in d.commands],
    )


def _bundle_of(path, bag, seed=0):
    return make_tiny_bundle(
        path,
        seed=seed,
        sources=[{'path': str(bag), 'sha256': bagio.sha256_of_bag(bag)}],
        extra={'train': {**TRAIN, 'clipnorm': 1.0}},
    )


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp('int8')
    bag = _drive_bag(root / 'drive')
    plain = _bundle_of(root / 'plain', bag)
    bundle = root / 'bundle'
    shutil.copytree(plain, bundle)
    assert main(['export', str(bundle), '--int8']) == 0
    return {'root': root, 'bag': bag, 'plain': plain, 'bundle': bundle}


def _held_out_episodes(bundle, bag):
    """The validation episodes of training's split, recomputed from the defaults it used."""
    config = load_bundle(bundle).config
    recordings = load_recordings([bag], config.preprocess, DatasetConfig(seq_len=1, burn_in=0),
                                 config.actions)  # fmt: skip
    split = split_by_episode(recordings.episodes, TRAIN['val_fraction'], TRAIN['seed'])
    assert split.val != split_by_episode(recordings.episodes, 0.2, 0).val  # a split of its own
    return split.val


def test_export_adds_an_int8_file_listed_with_precision_sha256_and_agreement(exported):
    b = load_bundle(exported['bundle'])  # the sha256 of every listed file is checked here
    entry = b.metadata['files'][INT8_FILE]
    assert b.precisions == ('fp32', 'int8')
    assert (
        entry['precision'] == 'int8' and b.metadata['files']['step.tflite']['precision'] == 'fp32'
    )
    assert entry['quantization'] in ('full_integer', 'dynamic_range')
    assert entry['tried'][0]['quantization'] == 'full_integer'  # tried first
    agreement = entry['agreement']
    assert agreement['on'] == 'validation episodes' and agreement['episodes'] == 1
    assert 0.0 <= agreement['same_action'] <= 1.0 and 0.0 <= agreement['max_prob_diff'] <= 1.0
    assert entry['representative']['from'] == 'training episodes'
    assert entry['representative']['samples'] == sum(EPISODES) - agreement['frames']
    # Smaller: weights int8. (The tiny model's flatbuffer overhead keeps it near 2.4x; the
    # default model's ratio is in bench/bench_int8.py.)
    assert entry['bytes'] * 2 < b.metadata['files']['step.tflite']['bytes']


def test_the_stored_agreement_is_fp32_vs_int8_stepped_over_the_held_out_episode(exported):
    held = _held_out_episodes(exported['bundle'], exported['bag'])
    entry = load_bundle(exported['bundle']).metadata['files'][INT8_FILE]
    assert entry['agreement']['frames'] == sum(len(ep) for ep in held)
    fp32 = Policy.from_bundle(exported['bundle'], num_threads=1)
    int8 = Policy.from_bundle(exported['bundle'], num_threads=1, precision='int8')
    assert (fp32.precision, int8.precision) == ('fp32', 'int8')
    same, worst, labels = [], 0.0, []
    for ep in held:
        for frame, label in zip(ep.frames, ep.labels, strict=True):
            a, b = fp32.step_fitted(frame), int8.step_fitted(frame)
            same.append(a.action == b.action)
            labels.append(label)
            worst = max(worst, float(np.max(np.abs(a.probabilities - b.probabilities))))
    same, labels = np.array(same), np.array(labels)
    assert np.mean(same) == pytest.approx(entry['agreement']['same_action'])
    assert worst == pytest.approx(entry['agreement']['max_prob_diff'], abs=1e-6)
    assert worst > 0.0  # the int8 file really ran, not the fp32 one
    # Per action label (the rare turns are where memory matters), and the score: the lowest of
    # all frames and each label with >= 10 frames.
    names = load_bundle(exported['bundle']).config.actions.names
    by_label = entry['agreement']['by_label']
    assert sum(v['frames'] for v in by_label.values()) == len(same)
    scored = [np.mean(same)]
    for name, value in by_label.items():
        mine = labels == names.index(name)
        assert value['frames'] == mine.sum()
        assert value['same_action'] == pytest.approx(np.mean(same[mine]))
        if mine.sum() >= 10:
            scored.append(np.mean(same[mine]))
    assert entry['agreement']['score'] == pytest.approx(min(scored))


def test_representative_states_are_the_ones_the_robot_reaches(exported):
    from malpi_ros.learn.model import build_state_model, load_sequence_model
    from malpi_ros.learn.quantize import state_trajectories

    b = load_bundle(exported['bundle'])
    episode = _held_out_episodes(exported['bundle'], exported['bag'])[0]
    model = build_state_model(b.config.model, load_sequence_model(b.keras_path, b.config.model))
    ((h, c),) = state_trajectories(model, [episode], b.config)
    policy = Policy.from_bundle(exported['bundle'], num_threads=1)
    assert not h[0].any() and not c[0].any()  # the first frame finds a zero state
    for k, frame in enumerate(episode.frames):
        ph, pc = policy.state
        np.testing.assert_allclose(h[k], ph[0], atol=1e-4)
        np.testing.assert_allclose(c[k], pc[0], atol=1e-4)
        policy.step_fitted(frame)
    assert np.abs(c[-1]).max() > 0.1  # states far from zero: something to calibrate


@pytest.mark.slow  # two more exports, ~10 s
def test_full_integer_falls_back_to_dynamic_range_below_the_threshold(exported, tmp_path):
    bundle = shutil.copytree(exported['plain'], tmp_path / 'bundle')
    assert main(['export', str(bundle), '--int8', '--min-agreement', '1.0']) == 0
    entry = load_bundle(bundle).metadata['files'][INT8_FILE]
    first = entry['tried'][0]
    assert first['quantization'] == 'full_integer' and first['score'] < 1.0, entry
    assert [t['quantization'] for t in entry['tried']] == ['full_integer', 'dynamic_range']
    assert entry['quantization'] == 'dynamic_range' and entry['min_agreement'] == 1.0
    forced = shutil.copytree(exported['plain'], tmp_path / 'forced')
    assert main(['export', str(forced), '--int8', '--quantization', 'full_integer']) == 0
    assert load_bundle(forced).metadata['files'][INT8_FILE]['quantization'] == 'full_integer'


def test_a_bad_int8_file_stops_start_up_naming_it(exported, tmp_path):
    bundle = shutil.copytree(exported['bundle'], tmp_path / 'bundle')
    data = bytearray((bundle / INT8_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / INT8_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf'{INT8_FILE}: sha256 does not match'):
        Policy.from_bundle(bundle, precision='int8')
    # Another model under the int8 name, with the metadata made to match it: its shapes
    # are not the bundle's.
    other = make_tiny_bundle(tmp_path / 'other', height=16, width=16)
    shutil.copyfile(other / 'step.tflite', bundle / INT8_FILE)
    meta = json.loads((bundle / METADATA_FILE).read_text())
    entry = meta['files'][INT8_FILE]
    entry['bytes'] = (bundle / INT8_FILE).stat().st_size
    from malpi_ros.runtime.bundle import sha256_file

    entry['sha256'] = sha256_file(bundle / INT8_FILE)
    meta['metadata_sha256'] = metadata_digest(meta)
    write_json(bundle / METADATA_FILE, meta)
    with pytest.raises(BundleError, match=rf'{INT8_FILE}: step model has'):
        Policy.from_bundle(bundle, precision='int8')
    # The int8 file of another model of the same shapes, its entry copied and resealed.
    twin = _bundle_of(tmp_path / 'twin', exported['bag'], seed=1)  # same shapes, other weights
    twin_meta = json.loads((twin / METADATA_FILE).read_text())
    shutil.copyfile(exported['bundle'] / INT8_FILE, twin / INT8_FILE)
    twin_meta['files'][INT8_FILE] = load_bundle(exported['bundle']).metadata['files'][INT8_FILE]
    twin_meta['metadata_sha256'] = metadata_digest(twin_meta)
    write_json(twin / METADATA_FILE, twin_meta)
    with pytest.raises(BundleError, match=rf'files.{INT8_FILE}.quantized_from: .*another model'):
        Policy.from_bundle(twin, precision='int8')
    # A precision that is not the file's role.
    entry['precision'] = 'fp32'
    meta['metadata_sha256'] = metadata_digest(meta)
    write_json(bundle / METADATA_FILE, meta)
    with pytest.raises(BundleError, match=rf'files.{INT8_FILE}.precision'):
        load_bundle(bundle)


def test_precision_int8_needs_the_file_and_litert(exported):
    with pytest.raises(BundleError, match=r'malpi-ros export .* --int8'):
        Policy.from_bundle(exported['plain'], precision='int8')
    with pytest.raises(ConfigError, match='litert'):
        Policy.from_bundle(exported['bundle'], backend='keras', precision='int8')
    with pytest.raises(ConfigError, match="got 'int4'"):
        Policy.from_bundle(exported['bundle'], precision='int4')
    with pytest.raises(ConfigError, match='must be one of'):
        add_model_file(exported['bundle'], exported['bag'], 'step.tflite')


@pytest.mark.slow  # ~6 s
def test_export_refuses_recordings_the_bundle_was_not_trained_on(exported, tmp_path, capsys):
    other = _drive_bag(tmp_path / 'other', seed=7)
    bundle = shutil.copytree(exported['plain'], tmp_path / 'bundle')
    assert main(['export', str(bundle), '--int8', '--bags', str(other)]) == 1
    err = capsys.readouterr().err
    assert str(other) in err and 'not one of the recordings' in err
    assert INT8_FILE not in load_bundle(bundle).metadata['files']  # the bundle is as it was
    moved = shutil.copytree(exported['plain'], tmp_path / 'moved')
    shutil.move(exported['bag'], tmp_path / 'elsewhere')
    try:
        assert main(['export', str(moved), '--int8']) == 1
        assert '--bags' in capsys.readouterr().err
        assert main(['export', str(moved), '--int8', '--bags', str(tmp_path / 'elsewhere')]) == 0
    finally:
        shutil.move(tmp_path / 'elsewhere', exported['bag'])


def test_policy_node_precision_parameter_is_checked():
    from malpi_ros.nodes.policy_node_config import PARAMETERS, PolicyNodeConfig

    assert PolicyNodeConfig(bundle='b').precision == 'fp32' == PARAMETERS['precision'].default
    assert PolicyNodeConfig(bundle='b', precision='int8').precision == 'int8'
    with pytest.raises(ConfigError, match="precision must be one of fp32, int8, got 'int4'"):
        PolicyNodeConfig(bundle='b', precision='int4')
    with pytest.raises(ConfigError, match="got backend 'keras'"):
        PolicyNodeConfig(bundle='b', backend='keras', precision='int8')
