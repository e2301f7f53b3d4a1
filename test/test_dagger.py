"""make dagger on a tiny scale: supervised recordings as a robot's, warm starts, and the round loop
whose table counts what the recordings hold (the real rounds are not in make test)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from modelfactory import TINY_CONVS, TINY_UNITS, make_tiny_bundle
from support import REPO

from malpi_ros.bagio.reader import open_bag
from malpi_ros.cli import main as cli_main
from malpi_ros.config_file import build_configs, read_config_file
from malpi_ros.errors import BundleError, ConfigError
from malpi_ros.learn.dataset import load_recordings
from malpi_ros.sim.dagger import DaggerConfig, count_frames, format_table, main, run_dagger
from malpi_ros.sim.record import (
    APPLIED_TOPIC,
    TELEOP_TOPIC,
    RecordConfig,
    record_expert,
    record_supervised,
)

DAGGER_YAML = REPO / 'config' / 'sim_dagger.yaml'


def tiny_train_config(tmp_path, epochs: int = 1):
    """config/sim_dagger.yaml with the tests' tiny model (24x32, two convs, LSTM 8)."""
    sections = yaml.safe_load(DAGGER_YAML.read_text())
    sections['model'] = {
        'height': 24,
        'width': 32,
        'convs': [
            {'filters': c.filters, 'kernel': c.kernel, 'stride': c.stride} for c in TINY_CONVS
        ],
        'lstm_units': TINY_UNITS,
    }
    sections['train']['epochs'] = epochs
    path = tmp_path / 'tiny_dagger.yaml'
    path.write_text(yaml.safe_dump(sections))
    return path


def configs(path):
    policy, dataset, _ = build_configs(read_config_file(path), {}, str(path))
    return policy, dataset


@pytest.mark.slow
def test_a_supervised_drive_is_recorded_as_a_robot_records_a_takeover(tmp_path):
    bundle = make_tiny_bundle(tmp_path / 'left', always='left')
    got = record_supervised(tmp_path / 'drive', bundle, laps=1, seed=0)
    summary = got.summaries[0]
    assert summary['laps'] == 1 and summary['takeovers'] >= 5, summary
    assert 0 < summary['takeover_frames'] < got.frames == summary['steps']
    with open_bag(tmp_path / 'drive') as bag:
        counts = {topic: count for topic, (_, count) in bag.topics.items()}
    # Every frame has the policy's command and what was applied; teleop only while it drove.
    assert counts['/camera/image_raw'] == counts['/cmd_vel'] == counts[APPLIED_TOPIC] == got.frames
    assert counts[TELEOP_TOPIC] == summary['takeover_frames']
    # Training labels it from ~/applied and counts the takeover frames the drive had.
    policy, dataset = configs(tiny_train_config(tmp_path))
    assert count_frames([tmp_path / 'drive'], policy, dataset) == (
        got.frames,
        summary['takeover_frames'],
    )


def test_max_frames_stops_an_expert_recording_mid_lap(tmp_path):
    got = record_expert(tmp_path / 'bag', RecordConfig(episodes=3, laps=1, max_frames=57))
    assert got.frames == 57 and got.laps == 0 and len(got.summaries) == 1
    with pytest.raises(ConfigError, match='record max_frames must be an integer >= 0, got -1'):
        RecordConfig(max_frames=-1)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'rounds': 0}, 'dagger rounds must be an integer >= 1, got 0'),
        ({'eval_laps': 0}, 'dagger eval_laps must be an integer >= 1, got 0'),
        ({'base_segments': -1}, 'dagger base_segments must be an integer >= 0, got -1'),
        ({'warm_start': 'yes'}, "dagger warm_start must be true or false, got 'yes'"),
        ({'image_format': 'png'}, "dagger image_format must be one of raw, jpeg, got 'png'"),
    ],
)
def test_bad_dagger_settings_say_what_was_received(kwargs, message):
    with pytest.raises(ConfigError) as err:
        DaggerConfig(**kwargs)
    assert message in str(err.value)


def test_the_command_refuses_bad_settings_before_doing_anything(tmp_path, capsys):
    assert main(['--out', str(tmp_path / 'runs'), '--rounds', '0']) == 2
    assert 'dagger: error: dagger rounds must be an integer >= 1, got 0' in capsys.readouterr().err
    assert not (tmp_path / 'runs').exists()


@pytest.mark.slow
def test_warm_start_begins_from_the_bundle_and_refuses_another_model(tmp_path, capsys):
    import keras

    from malpi_ros.config import TrainConfig
    from malpi_ros.learn.model import build_sequence_model, load_sequence_model
    from malpi_ros.learn.train import train
    from malpi_ros.runtime.bundle import load_bundle

    bag = tmp_path / 'bag'
    record_expert(bag, RecordConfig(episodes=1, laps=1, max_frames=60))
    policy, dataset = configs(tiny_train_config(tmp_path))
    start = make_tiny_bundle(tmp_path / 'start', actions=policy.actions, seed=3)
    # A learning rate this small leaves the weights where training started.
    still = TrainConfig(epochs=1, learning_rate=1e-12, val_fraction=0.0)
    train([bag], tmp_path / 'warm', policy, dataset, still, verbose=0, log=lambda _: None,
          warm_start=start)  # fmt: skip
    loaded = load_bundle(tmp_path / 'warm')
    warm = load_sequence_model(loaded.keras_path, loaded.config.model).get_weights()
    began = load_sequence_model(load_bundle(start).keras_path, policy.model).get_weights()
    keras.utils.set_random_seed(still.seed)  # where training starts without a warm start
    fresh = build_sequence_model(policy.model).get_weights()

    def gap(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))

    assert gap(began, warm) < 1e-6 and gap(fresh, warm) > 0.1
    other = make_tiny_bundle(tmp_path / 'other', height=12, width=16, actions=policy.actions)
    with pytest.raises(BundleError, match=r'warm start: .*other holds another model'):
        train([bag], tmp_path / 'never', policy, dataset, still, warm_start=other)
    assert not (tmp_path / 'never').exists()
    # The command line's --warm-start reaches it.
    cmd = ['train', str(bag), '--out', str(tmp_path / 'never'), '--warm-start', str(other)]
    assert cli_main([*cmd, '--config', str(tiny_train_config(tmp_path))]) == 1
    assert 'malpi-ros train: error: warm start: ' in capsys.readouterr().err
    assert not (tmp_path / 'never').exists()


@pytest.mark.slow
def test_the_round_loop_counts_what_its_recordings_hold(tmp_path):
    # One round (about 3 min on a loaded 2-core machine): round 0, round 1, the baseline.
    config = tiny_train_config(tmp_path)
    cfg = DaggerConfig(
        rounds=1, laps=1, eval_laps=1, base_episodes=1, base_segments=2, epochs=1, round_epochs=1
    )
    lines: list[str] = []
    rows = run_dagger(tmp_path, cfg, config, log=lines.append)
    assert [r.name for r in rows] == ['round 0', 'round 1', 'baseline (BC)']
    policy, dataset = configs(config)
    base, _ = count_frames([tmp_path / 'round0_bag'], policy, dataset)
    # Round 0: one clean lap and two short drives through cue and fork, one chunk long each
    # (the recipe carries the state: a longer drive would be cut, and its gradient with it);
    # the baseline's extra frames are laps only.
    episodes = load_recordings(
        [tmp_path / 'round0_bag'], policy.preprocess, dataset, policy.actions
    ).episodes
    assert dataset.state == 'carried' and dataset.drive_frames == dataset.seq_len
    assert sorted(len(e) for e in episodes)[:2] == [dataset.seq_len] * 2 and len(episodes) == 3
    assert any('(1 laps and 2 short drives through cue and fork)' in line for line in lines)
    # Each training's progress: its epochs with the time left.
    assert any(line.startswith('round0: epoch 1/1: ') for line in lines)
    r1, t1 = count_frames([tmp_path / 'round1_bag'], policy, dataset)
    # A one-epoch policy strays: the supervisor corrects it.
    assert t1 > 0 and base > 300
    round0, round1, baseline = rows
    # Expert frames: the clean laps, then plus the takeover frames the recording holds; every
    # frame of the supervised drive is trained on too.
    assert [r.expert_frames for r in rows[:2]] == [base, base + t1]
    assert [r.trained_frames for r in rows[:2]] == [base, base + r1]
    assert round1.takeover_frames == t1 and r1 > t1
    assert round0.takeovers_per_lap is None and round1.supervised_laps == 1
    assert round1.takeovers_per_lap == round1.takeovers >= 1
    # The baseline: as many expert frames, all of them clean expert laps.
    assert baseline.expert_frames == baseline.trained_frames == round1.expert_frames
    assert count_frames([tmp_path / 'baseline_bag'], policy, dataset) == (t1, 0)
    for r in rows:
        assert 0 <= r.forks_correct <= r.forks and r.off_track_events >= 0 and r.laps_driven > 0
    assert any('round1: trained on 2 bag(s) (warm start, 1 epochs)' in line for line in lines)
    assert any('baseline: trained on 2 bag(s) (1 epochs)' in line for line in lines)
    table = format_table(rows)
    assert table.count('\n| round ') == 2 and '\n| baseline (BC) |' in table
    assert f'| round 1 | {round1.takeovers:.2f} | {base + t1} | {base + r1} |' in table
