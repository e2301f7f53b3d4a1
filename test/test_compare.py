"""make compare's pipeline on a tiny scale: record at the long horizon, train the LSTM and a
window policy on the same bag, drive each in-process, and the table's columns."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import REPO

from malpi_ros.config import ModelConfig
from malpi_ros.model_cost import count_flops
from malpi_ros.runtime.bundle import load_bundle
from malpi_ros.sim.compare import (
    LSTM_BPTT,
    LSTM_BURN_IN,
    format_table,
    held_bytes,
    lstm_warm_start,
    recording_for,
    run_compare,
)
from malpi_ros.sim.record import RecordConfig


def load_config(run_dir: Path) -> ModelConfig:
    return load_bundle(run_dir / 'long_lstm').config.model


@pytest.mark.slow
def test_compare_trains_and_drives_each_kind_on_one_recording(tmp_path):
    lines = []
    entries = run_compare(
        tmp_path,
        horizons=['long'],
        windows=[2],
        record=RecordConfig(episodes=1, laps=1, segments=3, segment_frames=40),
        train_config=REPO / 'config' / 'sim_train.yaml',
        epochs=1,
        laps=1,
        seed=3,
        window_epochs=1,
        log=lines.append,
    )
    assert [(e.name, e.window, e.reset_every_frame) for e in entries] == [
        ('LSTM, state carried', 0, False),
        ('LSTM, state reset every frame', 0, True),
        ('window 2', 2, False),
    ]
    for e in entries:  # one epoch drives badly: the figures are checked, not the driving
        assert e.horizon == 'long' and e.laps <= 1 and 0 <= e.forks_correct <= e.forks
        assert e.step_ms_median > 0 and 20 < e.peak_rss_mb < 1000
    lstm, reset, window = entries
    # Compute a frame: the window policy runs the step model K = 2 times, the LSTM once.
    assert lstm.mflops == reset.mflops == sum(count_flops(load_config(tmp_path)).values()) / 1e6
    assert window.mflops == 2 * lstm.mflops
    for e in entries:  # the model part: the step less the frame's fit
        assert 0 < e.model_ms_median < e.step_ms_median
    assert lstm.held_bytes == held_bytes(0, 64, (30, 40, 3)) == 2 * 64 * 4
    assert window.held_bytes == 2 * 30 * 40 * 3  # two uint8 frames
    # The LSTM trains its long windows through their last LSTM_BPTT frames (the rest forward
    # only); the window policy its K frames whole.
    trained = {
        kind: load_bundle(tmp_path / f'long_{kind}').metadata['extra']['dataset']
        for kind in ('lstm', 'window2')
    }
    assert (trained['lstm']['burn_in'], trained['lstm']['bptt']) == (150, LSTM_BPTT['long'])
    assert (trained['window2']['burn_in'], trained['window2']['bptt']) == (1, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'long.cache',
        'long_bag',
        'long_lstm',
        'long_window2',
    ]
    table = format_table(entries)
    assert table.count('\n| long |') == 3
    assert "long: window 2 computes 2.0x the LSTM's FLOPs a frame, " in table
    assert any('recorded' in line for line in lines)
    # One horizon: its LSTM trains from scratch (no shorter horizon's weights to start from).
    assert any(line.startswith('long: trained LSTM, state carried in ') for line in lines)
    # Each training's progress: its epochs, with the time left.
    assert any(line.startswith('long, window 2: epoch 1/1: ') for line in lines)
    assert any(line.startswith('long, LSTM, state carried: epoch 1/1: ') for line in lines)


def test_each_horizon_records_drives_one_lstm_window_long():
    # The LSTM's windows reach about 90 frames before the long horizon's cue (58-60 frames
    # before the fork); the recording's short drives are exactly one window each.
    base = RecordConfig(episodes=1, laps=1, segments=3, segment_frames=40)
    for horizon, frames in (('short', 120), ('long', 160)):
        got = recording_for(horizon, base, 10)
        assert got.segment_frames == frames == LSTM_BURN_IN[horizon] + 10
        # The gradient reaches back past the cue (13-16 and 58-60 frames before the fork).
        assert {'short': 30, 'long': 75}[horizon] <= LSTM_BPTT[horizon] <= frames
        assert (got.episodes, got.laps, got.segments) == (1, 1, 3)


def test_each_horizons_lstm_starts_from_the_shorter_horizons_of_the_run():
    trained = {'short': Path('short_lstm')}
    assert lstm_warm_start('long', trained, curriculum=True) == Path('short_lstm')
    assert lstm_warm_start('long', trained, curriculum=False) is None
    assert lstm_warm_start('short', trained, curriculum=True) is None
    assert lstm_warm_start('long', {}, curriculum=True) is None
