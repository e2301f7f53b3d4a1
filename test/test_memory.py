"""The LSTM uses its memory on long drives, end to end, at the default model size (DESIGN §4).

Synthetic drives where the turn at a junction depends only on a cue shown 6 frames earlier,
with blank frames between (``bagfactory.cue_memory_drive``): 800-frame episodes of 50 cues,
48x64 bgr8 frames, held-out drives in sqlite3 bags. Trained through the CLI with the default
recipe and the default model (MaLPi convs, LSTM 128: only the input size and the epoch count
are given), then run the robot's way: ``Policy`` (LiteRT) frame by frame, the state carried
from the start of each 800-frame episode, via ``evaluate.evaluate_bundle``. Judged by accuracy
against frames since the last reset: the memory must hold at every distance, not only within a
training window's length of a reset (what the zero-state recipe gave: 0.60 over the episode,
README "The memory recipe"). With the state reset before every frame: chance.
"""

from __future__ import annotations

import numpy as np
import pytest
from bagfactory import cue_memory_drive, write_bag

from malpi_ros import cli
from malpi_ros.config import DatasetConfig, TrainConfig
from malpi_ros.learn.evaluate import evaluate_bundle
from malpi_ros.runtime.bundle import load_bundle

HEIGHT, WIDTH = 48, 64
EPOCHS = 24
TRAIN_BAGS = 3
TRIALS = 50  # cues per episode: 50 x (cue + 5 blanks + junction + 9 blanks) = 800 frames
TURNS = ('left', 'right')


def drive(seed: int) -> tuple:
    return cue_memory_drive(
        TRIALS, blanks=(5, 5), after=9, height=HEIGHT, width=WIDTH, seed=seed, start=1000.0
    )


def junction_accuracy(report) -> tuple[float, float, int]:
    """(accuracy on junction frames, share of the commoner turn there, junction count)."""
    labels = np.concatenate([e.labels for e in report.episodes])
    actions = np.concatenate([e.actions for e in report.episodes])
    turns = [report.action_names.index(t) for t in TURNS]
    at = np.isin(labels, turns)
    majority = max(np.mean(labels[at] == t) for t in turns)
    return float(np.mean(actions[at] == labels[at])), float(majority), int(at.sum())


@pytest.mark.slow
@pytest.mark.timeout(900)  # training ~2 min on 2 cores, the int8 export and runs ~0.5 more
def test_the_lstm_remembers_at_every_distance_from_the_last_reset(tmp_path, record_property):
    # The recipe under test is the default one: pin what it is.
    assert DatasetConfig().state == 'carried' and TrainConfig().learning_rate == 3e-4
    bags = [
        write_bag(tmp_path / f'cue{i}', frames=d.frames, commands=d.commands, encoding='bgr8')
        for i, d in enumerate(drive(seed) for seed in range(TRAIN_BAGS))
    ]
    held_out = [
        write_bag(tmp_path / f'held{i}', frames=d.frames, commands=d.commands,
                  encoding='bgr8', storage='sqlite3')
        for i, d in enumerate(drive(seed) for seed in (100, 101))
    ]  # fmt: skip
    assert len(drive(0).frames) == 800
    out = tmp_path / 'bundle'
    size = ['--height', str(HEIGHT), '--width', str(WIDTH)]
    args = ['train', *map(str, bags), '--out', str(out), *size, '--epochs', str(EPOCHS)]
    assert cli.main([*args, '--verbose', '0']) == 0

    carried = evaluate_bundle(out, held_out, parity=False, num_threads=1, focus=TURNS)
    reset = evaluate_bundle(
        out, held_out, parity=False, num_threads=1, focus=TURNS, reset_every_frame=True
    )
    carried_acc, majority, count = junction_accuracy(carried)
    reset_acc, _, _ = junction_accuracy(reset)
    buckets = carried.since_reset()
    metrics = load_bundle(out).metadata['metrics']
    line = (
        f'junction accuracy over {count} held-out junctions: state carried {carried_acc:.3f} '
        '(by frames since the reset: '
        + ', '.join(f'{b.name} {b.accuracy:.3f} of {b.frames}' for b in buckets)
        + f'), state reset every frame {reset_acc:.3f} (chance = commoner turn '
        f'{majority:.3f}); {metrics["epochs_run"]} epochs, best {metrics["best_epoch"]}'
    )
    print(line)
    record_property('junction_accuracy_carried', carried_acc)
    record_property('junction_accuracy_reset', reset_acc)
    for bucket in buckets:
        record_property(f'junction_accuracy_{bucket.name}', bucket.accuracy)
        assert bucket.frames > 0 and bucket.accuracy >= 0.85, line
    assert reset_acc <= majority + 0.05, line
    # Frames that need no memory are right either way.
    assert carried.metrics.accuracy > 0.9 and reset.metrics.accuracy > 0.8, line

    # The int8 step model on the same held-out drives, quantized the way `export --int8` keeps
    # for this bundle (dynamic-range: README "The int8 step model"); the asserts are issue 14's
    # targets. Full-integer export, fallback and stepping: test_export_int8.py (tiny model).
    assert cli.main(['export', str(out), '--int8', '--quantization', 'dynamic_range']) == 0
    int8 = {
        mode: junction_accuracy(
            evaluate_bundle(out, held_out, parity=False, num_threads=1, focus=TURNS,
                            reset_every_frame=mode == 'reset', precision='int8')
        )[0]
        for mode in ('carried', 'reset')
    }  # fmt: skip
    agreed = load_bundle(out).metadata['files']['step_int8.tflite']['agreement']
    int8_line = (
        f'int8 (dynamic_range): junction accuracy carried {int8["carried"]:.3f}, reset '
        f'{int8["reset"]:.3f}; same action as fp32 on {agreed["same_action"]:.4f} of '
        f'{agreed["frames"]} held-out frames, by label {agreed["by_label"]}, score '
        f'{agreed["score"]:.4f}, max probability difference {agreed["max_prob_diff"]:.4f}'
    )
    print(int8_line)
    record_property('junction_accuracy_dynamic_range_carried', int8['carried'])
    record_property('junction_accuracy_dynamic_range_reset', int8['reset'])
    assert int8['carried'] >= 0.85 and int8['reset'] <= 0.70, int8_line
