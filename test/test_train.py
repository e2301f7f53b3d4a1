"""malpi-ros train: the tf.data pipeline, end-to-end runs on real bags through the CLI, the
model learning what is in the data, and every bad input leaving --out untouched.

Tiny everything: 24x32 frames (16x16 in one case), two small convs, 8 LSTM units, 1-2 epochs.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from bagfactory import mcap_file, synthetic_drive, write_bag
from modelfactory import make_tiny_bundle
from support import NODE_DIR, limit_file_size, ros_env, small_disk

from malpi_ros import cli, diskspace
from malpi_ros.bagio.reader import storage_files
from malpi_ros.config import ActionTable, DatasetConfig, PreprocessConfig, TrainConfig
from malpi_ros.errors import ConfigError, DatasetError
from malpi_ros.learn import train as train_module
from malpi_ros.learn.dataset import load_recordings
from malpi_ros.learn.pipeline import WindowSource, class_weights, make_dataset
from malpi_ros.runtime.bundle import load_bundle, sha256_file
from malpi_ros.runtime.image import normalize

TINY_YAML = """
model:
  height: {height}
  width: {width}
  convs: [{{filters: 4, kernel: 4, stride: 2}}, {{filters: 8, kernel: 3, stride: 2}}]
  lstm_units: 8
dataset: {{burn_in: 2, seq_len: 6, stride: 3}}
train: {{epochs: {epochs}, batch_size: 8, min_epochs: 1, learning_rate: {lr}}}
"""
PNG = b'\x89PNG\r\n\x1a\n'
ARTIFACTS = ('history.csv', 'learning_curves.png', 'confusion.png', 'summary.txt')


def tiny_config(tmp_path, height=24, width=32, epochs=1, lr=1e-3, name='tiny.yaml'):
    path = tmp_path / name
    path.write_text(TINY_YAML.format(height=height, width=width, epochs=epochs, lr=lr))
    return path


def drive_bags(tmp_path, count=3, n=40, height=24, width=32, **bag_kwargs):
    bags = []
    for i in range(count):
        drive = synthetic_drive(n, seed=i, start=1000.0 + 100 * i, height=height, width=width)
        bags.append(
            write_bag(
                tmp_path / f'drive{i}', frames=drive.frames, commands=drive.commands, **bag_kwargs
            )
        )
    return bags


def bag_hashes(bags):
    return {str(f): sha256_file(f) for b in bags for f in storage_files(b)}


def tree(path):
    return {str(p.relative_to(path)): sha256_file(p) for p in path.rglob('*') if p.is_file()}


def run_train(*args):
    return cli.main(['train', *map(str, args), '--verbose', '0'])


@pytest.fixture
def step_traces(monkeypatch):
    """The class of each model whose train step was traced (each Python call is a trace):
    a run should trace its step once (``train.build_before_fit``), not twice."""
    import keras

    from malpi_ros.learn.carried_state import CarriedStateTrainer

    traced: list[str] = []
    for cls in (CarriedStateTrainer, keras.Model):
        real = cls.train_step

        def counted(self, data, real=real):
            traced.append(type(self).__name__)
            return real(self, data)

        monkeypatch.setattr(cls, 'train_step', counted)
    return traced


# -- the pipeline -----------------------------------------------------------------------------


def test_class_weights_balance_present_actions_cap_and_keep_the_mean_at_one():
    labels = np.array([1] * 80 + [2] * 10 + [3] * 10)
    w = class_weights(labels, 5, cap=10.0)
    assert w[0] == 0 and w[4] == 0  # absent actions: nothing to weight
    assert w[2] == pytest.approx(8 * w[1]) and w[3] == pytest.approx(w[2])
    assert float(w[labels].mean()) == pytest.approx(1.0)
    capped = class_weights(np.array([1] * 990 + [2] * 10), 5, cap=10.0)
    assert capped[2] == pytest.approx(10 * capped[1])  # 99x rarer, weighted only 10x
    with pytest.raises(DatasetError, match='no labels'):
        class_weights(np.array([], np.int64), 5, cap=10.0)


def test_batches_are_normalized_by_the_robots_code_and_burn_in_carries_no_weight(tmp_path):
    (bag,) = drive_bags(tmp_path, count=1, n=30)
    pre = PreprocessConfig(height=24, width=32, normalization='standardize')
    cfg = DatasetConfig(burn_in=3, seq_len=4, stride=2)
    rec = load_recordings([bag], pre, cfg, ActionTable())
    weights = np.arange(1, 6, dtype=np.float32)
    source = WindowSource(rec.episodes, rec.windows, cfg.window, cfg.burn_in, pre, weights)
    rows = np.array([2, 0, 5])
    x, y, w = source.batch(rows)
    assert x.shape == (3, 7, 24, 32, 3) and x.dtype == np.float32
    ep = rec.episodes[0]
    for i, row in enumerate(rows):
        start = rec.windows[row, 1]
        np.testing.assert_array_equal(x[i], normalize(ep.frames[start : start + 7], pre))
        np.testing.assert_array_equal(y[i], ep.labels[start : start + 7])
    assert (w[:, :3] == 0).all()
    np.testing.assert_array_equal(w[:, 3:], weights[y[:, 3:]])


def test_every_window_once_per_epoch_in_a_new_seeded_order(tmp_path):
    bags = drive_bags(tmp_path, count=2, n=30)
    pre = PreprocessConfig(height=24, width=32)
    cfg = DatasetConfig(burn_in=0, seq_len=5, stride=1)
    rec = load_recordings(bags, pre, cfg, ActionTable())
    # Frames are noisy, so a window's first frame says which window it is.
    source = WindowSource(rec.episodes, rec.windows, cfg.window, 0, pre, np.ones(5, np.float32))

    def epoch_orders(seed):
        dataset = make_dataset(source, 7, shuffle=True, seed=seed)
        orders = []
        for _ in range(2):
            firsts = []
            for x, _, _ in dataset:
                firsts += [x[i, 0].numpy().tobytes() for i in range(x.shape[0])]
            orders.append(firsts)
        return orders

    starts = {normalize(rec.episodes[e].frames[s], pre).tobytes(): (e, s) for e, s in rec.windows}
    first, second = epoch_orders(3)
    assert sorted(map(starts.get, first)) == sorted(map(tuple, rec.windows.tolist()))
    assert sorted(first) == sorted(second) and first != second
    assert epoch_orders(3) == [first, second]  # the same seed, the same epochs
    assert make_dataset(source, 7, shuffle=False).cardinality().numpy() == -(-len(source) // 7)


# -- end to end through the CLI ----------------------------------------------------------------


@pytest.mark.parametrize(
    ('storage', 'compressed', 'stamped', 'size'),
    [
        ('mcap', False, False, (24, 32)),
        ('sqlite3', True, True, (16, 16)),
    ],
    ids=['mcap-raw-twist', 'sqlite3-jpeg-twiststamped-16px'],
)
def test_train_writes_a_loadable_bundle_with_its_reports(
    tmp_path, capsys, step_traces, storage, compressed, stamped, size
):
    height, width = size
    bags = drive_bags(
        tmp_path, height=32, width=40, storage=storage, compressed=compressed, stamped=stamped
    )
    before = bag_hashes(bags)
    out = tmp_path / 'bundle'
    config = tiny_config(tmp_path, height, width, epochs=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        assert run_train(*bags, '--out', out, '--config', config) == 0
    # The carried chunks end each epoch by running out of data, by design: no warning about it.
    assert not [w for w in seen if 'ran out of data' in str(w.message)]
    assert step_traces == ['CarriedStateTrainer']  # traced once: built before fit
    printed = capsys.readouterr().out
    assert re.search(r'epoch 1/2: \d+ s an epoch, at most \d+ s left', printed), printed
    assert re.search(r'epoch 2/2: \d+ s an epoch, at most 0 s left', printed), printed
    # TensorBoard logs beside the bundle, one folder per run, training and validation scalars.
    (run,) = out.with_name('bundle.logs').iterdir()
    assert re.fullmatch(r'\d{8}-\d{6}', run.name)
    for part in ('train', 'validation'):
        assert list((run / part).glob('events.out.tfevents.*')), part

    bundle = load_bundle(out)
    assert bundle.config.model.input_shape == (height, width, 3)
    assert bundle.dt == pytest.approx(0.1)
    assert bundle.seq_len == 6  # the chunk the state was carried across
    sources = bundle.metadata['sources']
    assert [s['path'] for s in sources] == [str(b) for b in bags]
    assert all(len(s['sha256']) == 64 for s in sources)
    metrics = bundle.metadata['metrics']
    assert metrics['epochs_run'] == 2 and 0.0 <= metrics['accuracy'] <= 1.0
    assert set(metrics['per_class']) == set(ActionTable().names)
    assert metrics['training_state'] == 'carried'
    # Scored on whole held-out 40-frame episodes, the state carried, after the burn-in of 2.
    assert sum(map(sum, metrics['confusion'])) == metrics['val_episodes'] * (40 - 2) > 0
    assert bundle.metadata['extra']['dataset']['burn_in'] == 2
    for name in ARTIFACTS:
        assert name in bundle.metadata['extra_files'], name
    with (out / 'history.csv').open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {'loss', 'val_loss', 'accuracy', 'val_accuracy'} <= set(rows[0])
    for png in ('learning_curves.png', 'confusion.png'):
        assert (out / png).read_bytes()[:8] == PNG
    summary = (out / 'summary.txt').read_text()
    assert 'class weights' in summary and 'epochs run: 2 of 2' in summary
    assert 'held out for validation' in summary
    assert bag_hashes(bags) == before  # training never writes into its input bags
    # The cache beside the bundle is used by the next run.
    cache = out.with_name('bundle.cache')
    assert len(list(cache.glob('*.frames.npy'))) == 3
    assert run_train(*bags, '--out', out, '--config', config, '--epochs', '1') == 0
    assert load_bundle(out).metadata['metrics']['epochs_run'] == 1
    assert 'cache hit' in (out / 'summary.txt').read_text()


def test_command_line_flags_override_the_config_file(tmp_path, step_traces):
    bags = drive_bags(tmp_path, count=2, n=30)
    out = tmp_path / 'b'
    code = run_train(
        *bags, '--out', out, '--config', tiny_config(tmp_path), '--no-cache',
        '--state', 'zero', '--seq-len', '4', '--burn-in', '1', '--stride', '5', '--lr', '0.002',
        '--seed', '3', '--bptt', '4',
        '--val-fraction', '0.4', '--no-class-weights', '--batch-size', '4', '--no-logdir',
    )  # fmt: skip
    assert code == 0
    # The zero recipe with bptt fits a WindowTrainer around the model (its forward-only frames
    # outside the gradient), traced once.
    assert step_traces == ['WindowTrainer']
    meta = load_bundle(out).metadata
    assert meta['seq_len'] == 4  # the gradient reached back over the last 4 frames
    dataset = meta['extra']['dataset']
    assert (dataset['seq_len'], dataset['burn_in'], dataset['stride']) == (4, 1, 5)
    assert dataset['bptt'] == 4  # trained through the last 4 frames: the first forward only
    assert dataset['state'] == 'zero' and meta['metrics']['training_state'] == 'zero'
    # Windows of burn-in 1 + 4 scored steps, from a zero state: 4 scored steps each.
    confusion = meta['metrics']['confusion']
    assert sum(map(sum, confusion)) == meta['metrics']['val_windows'] * 4 > 0
    train = meta['extra']['train']
    assert (train['learning_rate'], train['seed'], train['batch_size']) == (0.002, 3, 4)
    assert train['class_weighting'] is False
    assert set(meta['metrics']['class_weights'].values()) == {1.0}
    assert not out.with_name('b.cache').exists()
    assert not out.with_name('b.logs').exists()


def test_no_validation_split_trains_and_scores_on_training_windows(tmp_path):
    """--val-fraction 0: Keras' history has no val_* values (CSV 'NA'); the run still ends
    with a bundle whose metrics say they were taken on the training windows."""
    bags = drive_bags(tmp_path, count=1, n=30)
    out = tmp_path / 'b'
    code = run_train(*bags, '--out', out, '--config', tiny_config(tmp_path), '--no-cache',
                     '--val-fraction', '0', '--epochs', '2')  # fmt: skip
    assert code == 0
    metrics = load_bundle(out).metadata['metrics']
    assert metrics['scored_on'].startswith('training')
    assert metrics['epochs_run'] == 2 and metrics['accuracy'] is not None


def test_the_model_learns_what_is_in_the_data_and_stops_at_the_target(tmp_path):
    """The commanded action is drawn in every frame (a coloured bar): > 90% on held-out
    episodes after a few epochs; --target-val-accuracy ends training at the first epoch that
    reaches it, long before the 40 allowed."""
    bags = []
    for i in range(5):
        drive = synthetic_drive(60, seed=10 + i, start=1000.0 + 100 * i)
        bags.append(write_bag(tmp_path / f'd{i}', frames=drive.frames, commands=drive.commands))
    out = tmp_path / 'bundle'
    config = tiny_config(tmp_path, epochs=40, lr=3e-3)
    code = run_train(*bags, '--out', out, '--config', config, '--val-fraction', '0.2',
                     '--target-val-accuracy', '0.95')  # fmt: skip
    assert code == 0
    metrics = load_bundle(out).metadata['metrics']
    print(f'validation accuracy {metrics["accuracy"]:.3f} after {metrics["epochs_run"]} epochs')
    assert metrics['scored_on'] == 'validation'
    assert metrics['accuracy'] > 0.9
    assert metrics['target_val_accuracy'] == 0.95
    assert metrics['target_reached_epoch'] == metrics['epochs_run'] < 40
    with (out / 'history.csv').open() as f:
        val = [float(row['val_accuracy']) for row in csv.DictReader(f)]
    assert val[-1] >= 0.95 and max(val[:-1], default=0.0) < 0.95  # the first epoch to reach it
    summary = (out / 'summary.txt').read_text()
    assert f'target validation accuracy 0.95: reached at epoch {len(val)}' in summary
    for bad in (0, 1.5, 'high'):
        with pytest.raises(ConfigError, match=f'target_val_accuracy must be a number in'
                           rf' \(0, 1\] or null, got {bad!r}'):  # fmt: skip
            TrainConfig(target_val_accuracy=bad)


def test_the_example_config_file_is_valid_and_holds_the_recipe():
    from support import REPO

    from malpi_ros.commands.train import build_configs, read_config_file

    sections = read_config_file(REPO / 'config' / 'train_example.yaml')
    policy, dataset, train = build_configs(sections, {})
    pre = policy.preprocess
    assert policy.model.input_shape == (pre.height, pre.width, pre.channels) == (120, 120, 3)
    assert policy.preprocess.normalization == 'standardize'
    assert (dataset.state, dataset.burn_in, dataset.seq_len) == ('carried', 10, 32)
    assert train.learning_rate == 3e-4
    assert dataset == DatasetConfig()  # the example holds the defaults
    assert train.class_weighting and train.min_epochs == 10


# -- bad input ---------------------------------------------------------------------------------


def _expect_failure(capsys, bags, out, config, *words):
    assert run_train(*bags, '--out', out, '--config', config) == 1
    err = capsys.readouterr().err
    assert err.startswith('malpi-ros train: error:')
    for word in words:
        assert word in err, (word, err)
    return err


def test_bad_bags_fail_naming_bag_and_topic_and_write_nothing(tmp_path, capsys):
    drive = synthetic_drive(30, seed=1)
    config = tiny_config(tmp_path)
    out = tmp_path / 'out'

    cut = write_bag(tmp_path / 'cut', frames=drive.frames, commands=drive.commands)
    file = mcap_file(cut)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    _expect_failure(capsys, [cut], out, config, f'bag {cut}')

    corrupt = write_bag(tmp_path / 'corrupt', frames=drive.frames, commands=drive.commands)
    file = mcap_file(corrupt)
    data = bytearray(file.read_bytes())
    data[100:-100] = bytes(len(data) - 200)
    file.write_bytes(bytes(data))
    _expect_failure(capsys, [corrupt], out, config, f'bag {corrupt}')

    no_images = write_bag(tmp_path / 'nocam', commands=drive.commands, image_topic=None)
    _expect_failure(capsys, [no_images], out, config, str(no_images), 'no image topic', '/cmd_vel')

    nan = [(t, float('nan'), float('nan')) for t, _, _ in drive.commands]
    all_nan = write_bag(tmp_path / 'nan', frames=drive.frames, commands=nan)
    _expect_failure(capsys, [all_nan], out, config, str(all_nan), 'topic /cmd_vel', 'NaN')

    # 2 frames: fewer than the burn-in of 2 + one scored step
    short = write_bag(tmp_path / 'short', frames=drive.frames[:2], commands=drive.commands[:2])
    _expect_failure(capsys, [short], out, config, 'long enough to train on', str(short))

    good = write_bag(tmp_path / 'good', frames=drive.frames, commands=drive.commands)
    _expect_failure(capsys, [good, tmp_path / 'missing'], out, config, 'no such file')

    bad_config = tmp_path / 'bad.yaml'
    bad_config.write_text('model: {lstm_units: 0}\n')
    _expect_failure(capsys, [good], out, bad_config, str(bad_config), 'lstm_units')
    bad_config.write_text('optimizer: {}\n')
    _expect_failure(capsys, [good], out, bad_config, 'unknown sections')

    assert not out.exists()
    assert not list(tmp_path.glob('.out*'))  # no temp dir left beside --out either


def test_out_that_is_not_a_bundle_is_refused_before_training(tmp_path, capsys):
    (bag,) = drive_bags(tmp_path, count=1)
    out = tmp_path / 'precious'
    out.mkdir()
    (out / 'thesis.tex').write_text('do not delete')
    _expect_failure(capsys, [bag], out, tiny_config(tmp_path), 'not a bundle')
    assert (out / 'thesis.tex').read_text() == 'do not delete'
    _expect_failure(capsys, [bag], bag, tiny_config(tmp_path), 'input bags')


def test_a_failed_run_leaves_the_existing_bundle_untouched(tmp_path, capsys, monkeypatch):
    bags = drive_bags(tmp_path, count=2, n=30)
    out = make_tiny_bundle(tmp_path / 'bundle')
    before = tree(out)
    config = tiny_config(tmp_path, epochs=2)

    # Bad data: an error, exit code 1.
    empty = write_bag(tmp_path / 'empty', frames=[], commands=[(1000.0, 0.3, 0.0)])
    _expect_failure(capsys, [empty], out, config, str(empty))
    assert tree(out) == before

    # A crash inside fit (after the first epoch's callbacks ran).
    def explode(self, epoch, logs=None):
        raise RuntimeError('disk on fire')

    monkeypatch.setattr(train_module.BestWeights, 'on_epoch_end', explode)
    with pytest.raises(RuntimeError, match='disk on fire'):
        run_train(*bags, '--out', out, '--config', config)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.bundle')) == []
    meta = json.loads((out / 'metadata.json').read_text())
    assert meta['metrics']['note'].startswith('random weights')


# -- a full disk -------------------------------------------------------------------------------


def test_too_little_room_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    bags = drive_bags(tmp_path, count=2, n=30)
    out = tmp_path / 'bundle'
    monkeypatch.setattr(diskspace, 'free_bytes', lambda path: 50_000)
    assert run_train(*bags, '--out', out, '--config', tiny_config(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert 'not enough room for the frame cache, the bundle and the backup' in err[0], err
    assert str(out) in err[0] and 'bundle.cache' in err[0] and '0.1 MB free' in err[0], err
    assert not out.exists() and not (tmp_path / 'bundle.cache').exists()


def test_a_cache_on_a_full_disk_is_one_error_not_a_bus_error(tmp_path):
    """Without preallocation the memory-mapped cache dies with SIGBUS when the disk fills."""
    (bag,) = drive_bags(tmp_path, count=1, n=40)  # 40 x 24 x 32 x 3 = 92 KB of frames
    disk = tmp_path / 'disk'
    script = f"""
import sys
from malpi_ros.config import ActionTable, DatasetConfig, PreprocessConfig
from malpi_ros.learn.dataset import load_recordings
from malpi_ros.errors import StorageError
try:
    load_recordings([{str(bag)!r}], PreprocessConfig(height=24, width=32),
                    DatasetConfig(burn_in=2, seq_len=6, stride=3), ActionTable(),
                    cache_dir={str(disk / 'cache')!r})
except StorageError as err:
    print(err)
    sys.exit(3)
"""
    with small_disk(disk, '64k'):
        done = subprocess.run(
            [sys.executable, '-c', script], capture_output=True, text=True, timeout=120
        )
        left = sorted(p.name for p in disk.rglob('*'))
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr[-2000:])
    assert done.stdout.startswith(f'frame cache {disk / "cache"}: no room for the frames of {bag}')
    assert 'No space left on device' in done.stdout
    assert left == []  # no frames.<pid>.tmp.npy, no empty cache directory


@pytest.mark.parametrize('backup', [False, True], ids=['bundle', 'backup'])
def test_a_full_disk_while_saving_is_one_line_and_the_old_bundle_stays(tmp_path, backup):
    """RLIMIT_FSIZE in the child: every write past 20 KB fails (EFBIG) as on a full disk;
    the bags and the cache fit, the model files do not (nor the backup of an epoch, the
    first thing written when there is one: with HDF5 that write killed the process)."""
    (bag,) = drive_bags(tmp_path, count=1, n=40)
    out = make_tiny_bundle(tmp_path / 'bundle')
    before = tree(out)
    cmd = [str(NODE_DIR / 'malpi-ros'), 'train', str(bag), '--out', str(out)]
    cmd += ['--config', str(tiny_config(tmp_path)), '--verbose', '0', '--no-cache']
    cmd += [] if backup else ['--no-backup']
    done = subprocess.run(
        cmd,
        env=ros_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size(20_000),
    )
    errors = [line for line in done.stderr.splitlines() if 'error' in line.lower()]
    assert done.returncode == 1, done.stderr[-3000:]
    assert 'Traceback' not in done.stderr, done.stderr[-3000:]
    where = '--backup-dir' if backup else '--out'
    assert len(errors) == 1 and errors[0].startswith(f'malpi-ros train: error: {where}'), errors
    assert 'no room to write' in errors[0] and 'File too large' in errors[0], errors
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.bundle')] == []
