"""learn.dataset: labels from hand-made timestamps, episodes, windows, the validation split,
and load_recordings on real bags (cache, malformed frames, NaN commands, every bad input)."""

from __future__ import annotations

import numpy as np
import pytest
from bagfactory import cue_memory_drive, mcap_file, synthetic_drive, write_bag, zero_png

from malpi_ros.config import ActionTable, DatasetConfig, PreprocessConfig
from malpi_ros.errors import BagError, DatasetError
from malpi_ros.learn import dataset as ds
from malpi_ros.runtime.image import fit_frame

TABLE = ActionTable()  # stop, forward, left, right, backward
STOP, FORWARD, LEFT, RIGHT = 0, 1, 2, 3
SMALL = PreprocessConfig(height=24, width=32)
NAN = float('nan')

# Frames at 10 Hz with a 1.5 s pause; commands: forward, left, a NaN, then right after the pause.
FRAME_T = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 2.0, 2.1, 2.2])
CMD_T = np.array([0.05, 0.25, 0.35, 2.05])
CMD_LIN = np.array([0.3, 0.2, NAN, 0.2])
CMD_ANG = np.array([0.0, 1.0, 0.0, -1.0])


def test_each_frame_gets_the_latest_command_at_or_before_it():
    labels, stats = ds.align_labels(FRAME_T, CMD_T, CMD_LIN, CMD_ANG, DatasetConfig(), TABLE)
    # 0.0: nothing yet -> stop; 2.0: the last command (0.25) is 1.75 s old -> stale -> stop.
    assert labels.tolist() == [STOP, FORWARD, FORWARD, LEFT, LEFT, LEFT, STOP, RIGHT, RIGHT]
    assert stats == ds.AlignmentStats(
        frames=9, commands=4, nan_commands=1, fresh=7, stale=2, dropped=0
    )


def test_stale_frames_are_dropped_when_asked():
    cfg = DatasetConfig(stale='drop')
    labels, stats = ds.align_labels(FRAME_T, CMD_T, CMD_LIN, CMD_ANG, cfg, TABLE)
    assert labels.tolist() == [-1, FORWARD, FORWARD, LEFT, LEFT, LEFT, -1, RIGHT, RIGHT]
    assert stats.dropped == 2 and stats.stale == 2


def test_lag_labels_a_frame_with_the_command_that_followed_it():
    cfg = DatasetConfig(lag=0.1)
    labels, _ = ds.align_labels(FRAME_T, CMD_T, CMD_LIN, CMD_ANG, cfg, TABLE)
    assert labels.tolist() == [FORWARD, FORWARD, LEFT, LEFT, LEFT, LEFT, RIGHT, RIGHT, RIGHT]


def test_a_command_exactly_at_the_frame_time_counts_and_timeout_is_inclusive():
    labels, _ = ds.align_labels(
        np.array([1.0, 1.5, 1.51]),
        np.array([1.0]),
        np.array([0.3]),
        np.array([0.0]),
        DatasetConfig(cmd_timeout=0.5),
        TABLE,
    )
    assert labels.tolist() == [FORWARD, FORWARD, STOP]


def test_nan_commands_are_ignored_as_if_never_sent():
    # The NaN at 0.35 would otherwise be the latest command of the frames at 0.4 and 0.5.
    labels, stats = ds.align_labels(
        FRAME_T[:6], CMD_T[:3], CMD_LIN[:3], CMD_ANG[:3], DatasetConfig(cmd_timeout=0.12), TABLE
    )
    # 0.4 is 0.05 s after the NaN but 0.15 s after the last real command: stale.
    assert labels.tolist() == [STOP, FORWARD, STOP, LEFT, STOP, STOP]
    assert stats.nan_commands == 1
    with pytest.raises(DatasetError, match='1-D'):
        ds.align_labels(FRAME_T, CMD_T, CMD_LIN[:2], CMD_ANG, DatasetConfig(), TABLE)


def test_episodes_split_at_gaps_and_at_dropped_frames():
    assert ds.split_episodes(FRAME_T, gap=1.0) == [slice(0, 6), slice(6, 9)]
    assert ds.split_episodes(FRAME_T, gap=2.0) == [slice(0, 9)]
    labels = np.array([-1, 1, 1, 2, -1, 2, -1, 3, 3])
    assert ds.split_episodes(FRAME_T, 1.0, labels) == [
        slice(1, 4),
        slice(5, 6),
        slice(7, 9),
    ]
    assert ds.split_episodes(np.zeros(0), 1.0) == []


def _episodes(lengths, start=0.0):
    episodes = []
    for i, n in enumerate(lengths):
        stamps = start + 100.0 * i + 0.1 * np.arange(n)
        episodes.append(
            ds.Episode(
                bag='hand.mcap',
                index=i,
                stamps=stamps,
                labels=np.full(n, i % 5, np.int64),
                frames=np.full((n, 2, 3, 3), i, np.uint8),
                dt=0.1,
            )
        )
    return episodes


def test_windows_never_cross_an_episode_boundary():
    cfg = DatasetConfig(state='zero', seq_len=2, burn_in=1, stride=2)  # window of 3 frames
    episodes = _episodes([6, 3, 2])
    assert ds.windows(episodes, cfg).tolist() == [[0, 0], [0, 2], [1, 0]]
    assert ds.short_episodes(episodes, cfg) == 1
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, size=30).tolist()
    cfg = DatasetConfig(state='zero', seq_len=7, burn_in=3, stride=4)
    episodes = _episodes(lengths)
    index = ds.windows(episodes, cfg)
    assert index.dtype == np.int64 and index.shape[1] == 2
    for ep, start in index:
        assert start >= 0 and start + cfg.window <= lengths[ep]
    expected = sum(max(0, (n - cfg.window) // cfg.stride + 1) for n in lengths)
    assert len(index) == expected
    assert ds.windows(_episodes([5]), cfg).shape == (0, 2)


def test_validation_episodes_are_never_training_episodes():
    episodes = _episodes([30, 50, 20, 40, 60, 10, 35, 25])
    split = ds.split_by_episode(episodes, 0.25, seed=1)
    train, val, note = split
    assert val and train
    assert not {id(e) for e in train} & {id(e) for e in val}
    assert {id(e) for e in train} | {id(e) for e in val} == {id(e) for e in episodes}
    val_frames = sum(len(e) for e in val)
    assert val_frames >= 0.25 * 270
    assert val_frames - max(len(e) for e in val) < 0.25 * 270  # stops once it has enough
    assert f'{len(val)} of 8 episodes' in note
    again = ds.split_by_episode(episodes, 0.25, seed=1)
    assert [e.index for e in again.val] == [e.index for e in val]
    assert ds.split_by_episode(episodes, 0.0, seed=1).val == []


def test_one_episode_is_split_by_time_and_the_note_says_so():
    (episode,) = _episodes([50])
    train, val, note = ds.split_by_episode([episode], 0.2, seed=0)
    assert [len(e) for e in train] == [40] and [len(e) for e in val] == [10]
    assert train[0].stamps.max() < val[0].stamps.min()
    assert 'only one episode' in note and 'split by time' in note and 'last 10 frames' in note
    assert val[0].frames.base is not None  # views of the original frames, not copies
    with pytest.raises(DatasetError, match='too few'):
        ds.split_by_episode(_episodes([1]), 0.5, seed=0)


def _drive_bag(tmp_path, name='drive', n=40, gap_after=None, **kwargs):
    drive = synthetic_drive(n, dt=0.1, start=100.0, seed=len(name))
    frames, commands = drive.frames, drive.commands
    if gap_after is not None:  # a 3 s pause in the recording after frame `gap_after`
        frames = frames[:gap_after] + [(t + 3.0, rgb) for t, rgb in frames[gap_after:]]
        commands = commands[:gap_after] + [(t + 3.0, a, b) for t, a, b in commands[gap_after:]]
    path = write_bag(tmp_path / name, frames=frames, commands=commands, **kwargs)
    return path, drive


@pytest.mark.parametrize('compressed', [False, True], ids=['raw', 'jpeg'])
def test_load_recordings_labels_frames_and_episodes(tmp_path, compressed):
    path, drive = _drive_bag(tmp_path, gap_after=25, compressed=compressed, stamped=compressed)
    cfg = DatasetConfig(state='zero', burn_in=0, seq_len=5, stride=5)
    rec = ds.load_recordings([path], SMALL, cfg, TABLE)
    assert [len(e) for e in rec.episodes] == [25, 15]
    np.testing.assert_array_equal(np.concatenate([e.labels for e in rec.episodes]), drive.labels)
    frames = np.concatenate([e.frames for e in rec.episodes])
    expected = np.stack([fit_frame(rgb, SMALL) for _, rgb in drive.frames])
    if compressed:
        assert np.abs(frames.astype(int) - expected).mean() < 12
    else:
        np.testing.assert_array_equal(frames, expected)
    assert frames.dtype == np.uint8 and frames.shape == (40, 24, 32, 3)
    assert rec.windows.tolist() == [
        [0, 0],
        [0, 5],
        [0, 10],
        [0, 15],
        [0, 20],
        [1, 0],
        [1, 5],
        [1, 10],
    ]
    assert rec.dt == pytest.approx(0.1)
    assert rec.label_histogram.tolist() == np.bincount(drive.labels, minlength=5).tolist()
    (report,) = rec.reports
    assert report.frames == 40 and report.malformed == 0 and report.cache == 'off'
    assert report.dt_source == 'header' and report.clock_offset == pytest.approx(0, abs=1e-6)
    assert report.topics.image_kind == ('compressed' if compressed else 'raw')
    assert report.alignment.fresh == 40
    assert '2 episodes, 40 frames, 8 windows' in rec.describe()


def test_several_bags_of_both_storages_give_episodes_per_bag(tmp_path):
    a, _ = _drive_bag(tmp_path, 'a', n=20)
    b, drive_b = _drive_bag(tmp_path, 'b', n=30, storage='sqlite3')
    rec = ds.load_recordings([a, b], SMALL, DatasetConfig(burn_in=0, seq_len=10), TABLE)
    assert [(e.bag, len(e)) for e in rec.episodes] == [(str(a), 20), (str(b), 30)]
    assert rec.frames == 50
    np.testing.assert_array_equal(rec.episodes[1].labels, drive_b.labels)
    assert rec.reports[0].sha256 != rec.reports[1].sha256


def test_a_camera_on_another_clock_is_still_aligned_on_receive_times(tmp_path):
    path, drive = _drive_bag(tmp_path, header_offset=-1e6, stamped=True)
    rec = ds.load_recordings([path], SMALL, DatasetConfig(), TABLE)
    np.testing.assert_array_equal(rec.episodes[0].labels, drive.labels)
    assert rec.reports[0].clock_offset == pytest.approx(-1e6)


def test_the_cue_task_reads_back_with_its_labels(tmp_path):
    drive = cue_memory_drive(trials=4, seed=2)
    assert drive.junctions.sum() == 4
    assert set(drive.labels[drive.junctions]) <= {LEFT, RIGHT}
    assert set(drive.labels[~drive.junctions]) == {FORWARD}
    path = write_bag(tmp_path / 'cue', frames=drive.frames, commands=drive.commands)
    rec = ds.load_recordings([path], SMALL, DatasetConfig(burn_in=0, seq_len=8), TABLE)
    np.testing.assert_array_equal(rec.episodes[0].labels, drive.labels)


def test_the_frame_cache_is_written_once_and_read_back(tmp_path):
    path, _ = _drive_bag(tmp_path)
    cache = tmp_path / 'cache'
    cfg = DatasetConfig(burn_in=0, seq_len=5)
    first = ds.load_recordings([path], SMALL, cfg, TABLE, cache_dir=cache)
    second = ds.load_recordings([path], SMALL, cfg, TABLE, cache_dir=cache)
    assert first.reports[0].cache == 'written' and second.reports[0].cache == 'hit'
    assert first.reports[0].cache_file == second.reports[0].cache_file
    frames = second.episodes[0].frames
    assert isinstance(frames, np.memmap) or isinstance(frames.base, np.memmap)
    np.testing.assert_array_equal(frames, first.episodes[0].frames)
    np.testing.assert_array_equal(second.episodes[0].labels, first.episodes[0].labels)
    with pytest.raises(ValueError, match='read-only'):
        frames[0, 0, 0, 0] = 1  # the cache cannot be changed through an episode
    # Other preprocessing -> another entry; the labelling rules are not part of the key.
    other = ds.load_recordings(
        [path], PreprocessConfig(height=12, width=16), cfg, TABLE, cache_dir=cache
    )
    assert other.reports[0].cache == 'written' and other.episodes[0].frames.shape[1:] == (
        12,
        16,
        3,
    )
    relabel = ds.load_recordings(
        [path], SMALL, DatasetConfig(burn_in=0, seq_len=5, lag=0.2), TABLE, cache_dir=cache
    )
    assert relabel.reports[0].cache == 'hit'
    assert len(list(cache.glob('*.frames.npy'))) == 2 and not list(cache.glob('*tmp*'))
    # A damaged entry is rebuilt, not trusted.
    next(cache.glob('*.meta.npz')).write_bytes(b'not a zip')
    assert {
        ds.load_recordings([path], p, cfg, TABLE, cache_dir=cache).reports[0].cache
        for p in (SMALL, PreprocessConfig(height=12, width=16))
    } == {'hit', 'written'}


def test_frames_of_mixed_sizes_are_fitted(tmp_path):
    drive = synthetic_drive(20, seed=5)
    big = [
        (t, np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)) if i % 2 else (t, rgb)
        for i, (t, rgb) in enumerate(drive.frames)
    ]
    path = write_bag(tmp_path / 'mixed', frames=big, commands=drive.commands)
    rec = ds.load_recordings([path], SMALL, DatasetConfig(burn_in=0, seq_len=5), TABLE)
    assert rec.reports[0].malformed == 0
    assert rec.episodes[0].frames.shape == (20, 24, 32, 3)
    # a 2x upscaled frame, area-resized back, is the original
    np.testing.assert_array_equal(rec.episodes[0].frames[1], drive.frames[1][1])


def test_malformed_frames_are_skipped_and_counted_with_the_reason(tmp_path):
    drive = synthetic_drive(30, seed=6)
    frames = list(drive.frames)
    for i in (3, 4, 17):
        frames[i] = (frames[i][0], frames[i][1], {'data': b'short'})
    frames[20] = (frames[20][0], frames[20][1], {'encoding': 'weird16'})
    path = write_bag(tmp_path / 'bad', frames=frames, commands=drive.commands)
    rec = ds.load_recordings([path], SMALL, DatasetConfig(burn_in=0, seq_len=5), TABLE)
    report = rec.reports[0]
    assert (report.image_messages, report.frames, report.malformed) == (30, 26, 4)
    reasons = dict(report.malformed_reasons)
    assert sum(reasons.values()) == 4
    assert any('shorter' in r for r in reasons) and any('weird16' in r for r in reasons)
    keep = [i for i in range(30) if i not in (3, 4, 17, 20)]
    np.testing.assert_array_equal(rec.episodes[0].labels, drive.labels[keep])
    assert 'malformed x' in rec.describe()


def test_nan_commands_are_counted_and_all_nan_is_an_error(tmp_path):
    drive = synthetic_drive(20, seed=7)
    commands = [
        (t, NAN, a) if i % 4 == 0 else (t, lin, a) for i, (t, lin, a) in enumerate(drive.commands)
    ]
    path = write_bag(tmp_path / 'some', frames=drive.frames, commands=commands)
    rec = ds.load_recordings([path], SMALL, DatasetConfig(burn_in=0, seq_len=5), TABLE)
    assert rec.reports[0].alignment.nan_commands == 5
    labels = rec.episodes[0].labels
    kept = [i for i in range(20) if i % 4 != 0]
    np.testing.assert_array_equal(labels[kept], drive.labels[kept])  # others: previous command
    all_nan = [(t, NAN, NAN) for t, _, _ in drive.commands]
    path = write_bag(tmp_path / 'nan', frames=drive.frames, commands=all_nan)
    with pytest.raises(DatasetError, match=rf'bag {path}, topic /cmd_vel: all 20 commands'):
        ds.load_recordings([path], SMALL, DatasetConfig(burn_in=0, seq_len=5), TABLE)


def test_bad_bags_are_errors_that_name_bag_and_topic(tmp_path):
    drive = synthetic_drive(20, seed=8)
    cfg = DatasetConfig(burn_in=0, seq_len=5)
    no_camera = write_bag(tmp_path / 'nocam', commands=drive.commands, image_topic=None)
    with pytest.raises(
        BagError, match=r'no image topic.*/cmd_vel: geometry_msgs/msg/Twist \(20\)'
    ):
        ds.load_recordings([no_camera], SMALL, cfg, TABLE)
    no_cmd = write_bag(tmp_path / 'nocmd', frames=drive.frames, commands=[])
    with pytest.raises(BagError, match=r'topic /cmd_vel: no messages'):
        ds.load_recordings([no_cmd], SMALL, cfg, TABLE)
    cut = write_bag(tmp_path / 'cut', frames=drive.frames, commands=drive.commands)
    file = mcap_file(cut)
    file.write_bytes(file.read_bytes()[:-200])
    with pytest.raises(BagError, match=f'bag {cut}'):
        ds.load_recordings([cut], SMALL, cfg, TABLE)
    garbage = [(t, rgb, {'encoding': 'nope'}) for t, rgb in drive.frames]
    undecodable = write_bag(tmp_path / 'junk', frames=garbage, commands=drive.commands)
    with pytest.raises(DatasetError, match=r'topic /camera/image_raw: none of 20 frames'):
        ds.load_recordings([undecodable], SMALL, cfg, TABLE)
    with pytest.raises(DatasetError, match='no bags'):
        ds.load_recordings([], SMALL, cfg, TABLE)


def test_no_window_at_all_is_a_dataset_error(tmp_path):
    path, _ = _drive_bag(tmp_path, n=20, gap_after=10)
    windows = DatasetConfig(state='zero', seq_len=12, burn_in=3)
    with pytest.raises(DatasetError, match=r'15 frames for windows of 15 frames.*: 10, .*: 10'):
        ds.load_recordings([path], SMALL, windows, TABLE)
    # With the state carried an episode needs one scored step after the burn-in.
    assert (
        len(ds.load_recordings([path], SMALL, DatasetConfig(seq_len=12, burn_in=9), TABLE).windows)
        == 2
    )
    with pytest.raises(DatasetError, match=r'11 frames for chunks of 12 frames, burn_in 10'):
        ds.load_recordings([path], SMALL, DatasetConfig(seq_len=12, burn_in=10), TABLE)


def test_stale_stretches_are_dropped_and_split_the_episode(tmp_path):
    drive = synthetic_drive(40, seed=9)
    # The driver let go of the stick for 2 s in the middle: no commands for frames 15..34.
    commands = drive.commands[:15] + drive.commands[35:]
    path = write_bag(tmp_path / 'pause', frames=drive.frames, commands=commands)
    cfg = DatasetConfig(burn_in=0, seq_len=5, stale='drop', cmd_timeout=0.5)
    rec = ds.load_recordings([path], SMALL, cfg, TABLE)
    # Commands come 25 ms before their frame: frame 18 sees command 14 0.425 s old, frame 19
    # 0.525 s old. 19..34 are stale and dropped.
    assert [len(e) for e in rec.episodes] == [19, 5]
    assert rec.reports[0].alignment.dropped == 16
    stop = ds.load_recordings([path], SMALL, DatasetConfig(burn_in=0, seq_len=5), TABLE)
    assert [len(e) for e in stop.episodes] == [40]
    assert (stop.episodes[0].labels[19:35] == STOP).all()


def test_the_frame_sink_grows_past_the_index_count(tmp_path):
    frames = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    for path in (None, tmp_path / 'grow.npy'):
        sink = ds._FrameSink((2, 2, 3), 1, path)
        for frame in frames:
            sink.append(frame)
        np.testing.assert_array_equal(sink.finish()[:5], frames)
    np.testing.assert_array_equal(np.load(tmp_path / 'grow.npy')[:5], frames)


def test_dt_falls_back_to_receive_times_when_a_frame_has_no_header_stamp(tmp_path):
    # header_offset -100: the first frame's stamp is 0, i.e. unset.
    path, _ = _drive_bag(tmp_path, header_offset=-100.0)
    rec = ds.load_recordings([path], SMALL, DatasetConfig(burn_in=0, seq_len=5), TABLE)
    assert rec.reports[0].dt_source == 'receive'
    assert rec.dt == pytest.approx(0.1) and rec.episodes[0].dt == pytest.approx(0.1)


def test_recordings_at_different_frame_rates_are_refused(tmp_path):
    """The bundle stores one dt and the LSTM learns one rate: 10 Hz and 20 Hz do not mix."""
    drive = synthetic_drive(30, height=24, width=32)
    slow = write_bag(tmp_path / 'slow', frames=drive.frames, commands=drive.commands)
    fast_frames = [(t / 2, rgb) for t, rgb in drive.frames]
    fast_commands = [(t / 2, a, b) for t, a, b in drive.commands]
    fast = write_bag(tmp_path / 'fast', frames=fast_frames, commands=fast_commands)
    cfg = DatasetConfig(burn_in=0, seq_len=5)
    with pytest.raises(DatasetError, match='different frame periods') as err:
        ds.load_recordings([slow, fast], SMALL, cfg, TABLE)
    assert 'slow' in str(err.value) and 'fast' in str(err.value)
    assert len(ds.load_recordings([slow, slow], SMALL, cfg, TABLE).episodes) == 2


def test_a_png_bomb_in_a_training_bag_is_counted_malformed_not_decoded(tmp_path):
    drive = synthetic_drive(20, seed=12)
    frames = list(drive.frames)
    frames[5] = (frames[5][0], frames[5][1], {'format': 'png', 'data': zero_png(20000, 20000)})
    path = write_bag(tmp_path / 'bomb', frames=frames, commands=drive.commands, compressed=True)
    rec = ds.load_recordings([path], SMALL, DatasetConfig(burn_in=0, seq_len=5), TABLE)
    report = rec.reports[0]
    assert (report.image_messages, report.frames, report.malformed) == (20, 19, 1)
    [(reason, count)] = report.malformed_reasons
    assert count == 1 and 'over the limit of 16777216 (max_frame_pixels)' in reason
