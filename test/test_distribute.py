"""Training past one machine: episodes shared among workers, each replica's lanes kept on it,
a killed run resumed from its backup, and two worker processes on loopback
(MultiWorkerMirroredStrategy, TF_CONFIG with 127.0.0.1 ports) writing one bundle.

Tiny everything: 24x32 frames, two small convs, 8 LSTM units, a few epochs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from support import NODE_DIR, free_ports, ros_env, stop, wait_for
from test_train import drive_bags, run_train, tiny_config

from malpi_ros.config import PreprocessConfig
from malpi_ros.learn import train as train_module
from malpi_ros.learn.dataset import (
    Episode,
    share_by_episode,
)
from malpi_ros.learn.distribute import Placement, check_split, worker_sources
from malpi_ros.learn.evaluate import evaluate_bundle
from malpi_ros.learn.pipeline import (
    ChunkSource,
    WindowSource,
    replica_chunk_dataset,
    replica_window_dataset,
)
from malpi_ros.runtime.bundle import load_bundle

# 'unit': a pixel value v comes back as v / 255
PRE = PreprocessConfig(height=2, width=2, normalization='unit')


def numbered_episodes(lengths):
    """Episodes whose frames say who they are: pixel 0 = episode, pixel 1 = frame index."""
    episodes = []
    for e, n in enumerate(lengths):
        frames = np.zeros((n, 2, 2, 3), np.uint8)
        frames[:, 0, 0, 0] = e
        frames[:, 0, 1, 0] = np.arange(n)
        labels = np.arange(n, dtype=np.int64) % 5
        episodes.append(Episode('bag', e, np.arange(n) * 0.1, labels, frames, 0.1))
    return episodes


def who(x):
    """(episode, frame) of every step of a batch x (B, T, 2, 2, 3)."""
    pixels = np.rint(np.asarray(x) * 255).astype(int)
    return pixels[..., 0, 0, 0], pixels[..., 0, 1, 0]


def test_workers_share_whole_episodes_evenly_and_the_same_on_every_worker():
    lengths = [50, 10, 40, 30, 20, 60]
    shares = share_by_episode(lengths, 2)
    assert sorted(e for s in shares for e in s) == list(range(6))  # each to one worker
    assert [sum(lengths[e] for e in s) for s in shares] == [110, 100]
    assert share_by_episode(lengths, 2) == shares
    assert share_by_episode(lengths, 1) == [list(range(6))]
    assert share_by_episode([5], 3) == [[0], [], []]


def test_a_split_that_cannot_work_is_refused_naming_the_setting():
    source = ChunkSource(numbered_episodes([20, 20, 20]), 4, 8, 0, PRE, np.ones(5, np.float32))
    with pytest.raises(ValueError, match=r'batch_size 8 .* among 3 replicas'):
        check_split(source, Placement(workers=3, worker=0), 8)
    with pytest.raises(ValueError, match='3 training episodes cannot be shared among 4'):
        check_split(source, Placement(workers=4, worker=1), 8)
    note = check_split(source, Placement(workers=2, worker=1, chief=False), 8)
    assert 'worker 1 of 2' in note and '4 per replica of the global batch 8' in note


def test_each_replica_steps_through_its_own_lanes_and_workers_run_the_same_steps():
    """2 workers x 2 replicas, 8 lanes: every frame once per epoch, on one worker; a replica's
    lane continues where it stopped (or starts from a zero state at a piece's start)."""
    episodes = numbered_episodes([37, 12, 25, 30, 9, 44])
    source = ChunkSource(episodes, 5, 8, 0, PRE, np.ones(5, np.float32))
    where = Placement(workers=2, worker=0, replicas=2)
    sources = worker_sources(source, where, 8)
    seen = set()
    counts = []
    for worker in range(2):
        own = {episodes.index(e) for e in sources[worker].episodes}
        elements = list(replica_chunk_dataset(sources, worker, 2, shuffle=True, seed=4))
        counts.append(len(elements))
        for replica in range(2):
            last = {}
            for (x, reset), _, w in elements[replica::2]:
                assert x.shape[0] == 2  # 8 lanes / 4 replicas
                ep, frame = who(x)
                for lane in range(2):
                    real = np.asarray(w[lane]) > 0
                    if not real.any():
                        continue
                    steps = list(zip(ep[lane][real], frame[lane][real], strict=True))
                    assert {e for e, _ in steps} <= own  # its own share only
                    if float(reset[lane]) == 0.0:
                        assert steps[0] == (last[lane][0], last[lane][1] + 1)
                    last[lane] = steps[-1]
                    for e, f in steps:
                        assert (worker, e, f) not in seen
                        seen.add((worker, e, f))
    assert counts[0] == counts[1]  # collective steps: every worker in every one
    assert sorted((e, f) for _, e, f in seen) == [
        (e, f) for e, ep in enumerate(episodes) for f in range(len(ep))
    ]


def test_window_batches_are_shared_by_episode_padded_with_weight_zero_and_validated_evenly():
    episodes = numbered_episodes([23, 11, 17])
    index = np.array([[e, s] for e, ep in enumerate(episodes) for s in range(len(ep) - 3)])
    source = WindowSource(episodes, index, 4, 1, PRE, np.ones(5, np.float32))
    sources = worker_sources(source, Placement(workers=2), 6)
    starts, counts = [], []
    for worker in range(2):
        batches = list(replica_window_dataset(sources, worker, 1, 3, shuffle=True, seed=1))
        counts.append(len(batches))
        for x, _, w in batches:
            ep, frame = who(x)
            real = np.asarray(w)[:, 1] > 0
            assert not np.asarray(w)[~real].any()
            starts += [(worker, e, f) for e, f in zip(ep[real, 0], frame[real, 0], strict=True)]
    assert counts[0] == counts[1] == -(-max(len(s) for s in sources) // 3)
    assert sorted((e, f) for _, e, f in starts) == sorted(map(tuple, index.tolist()))
    assert len({e for w, e, _ in starts if w == 0} & {e for w, e, _ in starts if w == 1}) == 0
    # Validation: window by window, as many to each of 2 workers x 2 replicas (the odd one
    # left out), so no batch carries a padding row to dilute val_loss.
    val = worker_sources(source, Placement(workers=2, replicas=2), 8, training=False)
    assert [len(v) for v in val] == [(len(source) // 4) * 2] * 2
    seen = []
    for worker in range(2):
        for x, _, w in replica_window_dataset(val, worker, 2, 2, shuffle=False):
            assert (np.asarray(w)[:, 1] > 0).all()  # every row real
            ep, frame = who(x)
            seen += list(zip(ep[:, 0], frame[:, 0], strict=True))
    assert len(seen) == len(set(seen)) == (len(source) // 4) * 4


def test_a_killed_run_resumes_from_its_backup_with_its_whole_history(
    tmp_path, capsys, monkeypatch
):
    bags = drive_bags(tmp_path, count=2, n=30)
    out = tmp_path / 'bundle'
    config = tiny_config(tmp_path, epochs=3)
    backup = tmp_path / 'bundle.backup'
    real_end = train_module.TimeLeft.on_epoch_end

    def killed_in_epoch_3(self, epoch, logs=None):
        real_end(self, epoch, logs)
        if epoch == 2:  # epoch 3 ends: logged in history.csv, not yet backed up
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module.TimeLeft, 'on_epoch_end', killed_in_epoch_3)
    assert run_train(*bags, '--out', out, '--config', config, '--no-logdir') == 130
    assert not out.exists()
    assert json.loads((backup / 'state.json').read_text())['epoch'] == 2
    capsys.readouterr()
    # Killed again with other settings: that backup is not resumed, but replaced.
    other = [*bags, '--out', out, '--config', config, '--no-logdir', '--lr', '0.002']
    assert run_train(*other) == 130
    printed = capsys.readouterr().out
    assert 'is of a run with other settings: not resumed' in printed and 'epoch 1/3' in printed
    monkeypatch.undo()
    assert run_train(*other) == 0
    printed = capsys.readouterr().out
    assert 'epoch 2 was the last finished, training goes on at epoch 3' in printed
    assert 'epoch 1/3' not in printed and 'epoch 3/3' in printed
    meta = load_bundle(out).metadata
    assert meta['metrics']['epochs_run'] == 3  # the history of both runs, once each
    assert (out / 'history.csv').read_text().count('\n') == 4  # epoch 3 of the kill: dropped
    assert not backup.exists()  # removed once the bundle is written


@pytest.mark.timeout(600)  # ~50 s on a quiet machine; 258 s seen at load 8-11
def test_two_workers_on_loopback_write_one_bundle_and_a_killed_worker_costs_an_epoch(tmp_path):
    """Worker 1 is SIGKILLed once the chief has backed up epoch 1 and started again; the chief
    loses its peer and exits, and is started again too (as a launcher restarts what failed):
    both resume at epoch 2 from the backup and the chief writes the bundle. Worker 1's own
    --out stays empty; the bundle keeps the parity contract; its validation loss is within 10%
    of one process's with the same global batch, seed and epochs."""
    bags = drive_bags(tmp_path, count=5, n=40)
    # 4 epochs: the kill lands while 3 remain, however fast the machine (the chief needs
    # worker 1 in every step of them).
    config = tiny_config(tmp_path, epochs=4, lr=3e-3)
    out, backup = tmp_path / 'bundle', tmp_path / 'shared.backup'
    common = [*map(str, bags), '--config', str(config), '--no-logdir']
    args = [*common, '--verbose', '2', '--distribute', 'multi-worker', '--backup-dir', str(backup)]
    cluster = {'worker': [f'127.0.0.1:{port}' for port in free_ports(2)]}
    logs = []

    def start(index, where):
        task = {'cluster': cluster, 'task': {'type': 'worker', 'index': index}}
        logs.append(tmp_path / f'worker{index}.{len(logs)}.log')
        cmd = [str(NODE_DIR / 'malpi-ros'), 'train', *args, '--out', str(where)]
        with logs[-1].open('w') as f:
            env = ros_env(TF_CONFIG=json.dumps(task))
            return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)

    chief, other = start(0, out), start(1, tmp_path / 'w1' / 'bundle')
    try:
        state = backup / 'state.json'
        assert wait_for(state.exists, 240, 0.02), logs[0].read_text()[-3000:]
        other.kill()  # SIGKILL, in epoch 2
        other.wait()
        other = start(1, tmp_path / 'w1' / 'bundle')
        assert chief.wait(timeout=120) != 0  # its peer died mid-epoch: it fails...
        chief = start(0, out)  # ...and is started again
        assert chief.wait(timeout=300) == 0, logs[-1].read_text()[-3000:]
        assert other.wait(timeout=60) == 0, logs[-2].read_text()[-3000:]
    finally:
        for proc in (chief, other):
            if proc.poll() is None:
                stop(proc)
    resumed = logs[-1].read_text(), logs[-2].read_text()
    for text in resumed:
        epoch = re.search(r'epoch (\d+) was the last finished, training goes on at epoch', text)
        assert epoch and int(epoch[1]) + 1 >= 2, text[-3000:]
    assert 'bundle written' in resumed[0] and 'bundle written' not in resumed[1]
    assert sorted(p.name for p in (tmp_path / 'w1').iterdir()) == ['bundle.cache']
    assert not backup.exists()
    bundle = load_bundle(out)
    two = bundle.metadata['metrics']
    assert two['epochs_run'] == 4 and bundle.metadata['extra']['train']['batch_size'] == 8
    report = evaluate_bundle(out, bags[:1], backend='keras')
    assert report.parity is not None and report.parity.max_abs_diff <= 1e-5
    single = tmp_path / 'single'
    assert run_train(*common, '--out', single, '--distribute', 'none', '--no-backup') == 0
    one = load_bundle(single).metadata['metrics']
    print(f'val_loss: 2 workers {two["val_loss_at_best"]:.4f}, 1 {one["val_loss_at_best"]:.4f}')
    assert two['val_loss_at_best'] == pytest.approx(one['val_loss_at_best'], rel=0.10)


MIRRORED_ON_TWO_CPUS = """
import sys
import tensorflow as tf

# Two logical CPUs stand in for two GPUs: MirroredStrategy over both, one replica each.
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
devices = ['/cpu:0', '/cpu:1']
real = tf.distribute.MirroredStrategy
tf.distribute.MirroredStrategy = lambda: real(devices)
from malpi_ros.cli import main
from malpi_ros.learn import pipeline
from malpi_ros.learn import train as train_module

# How often fit draws the validation plan (opens the validation batches): once an epoch.
drawn = []
real_plan, real_fit = pipeline.ChunkSource.plan, train_module._fit


def plan(self, rng=None):
    drawn.append(self.split)
    return real_plan(self, rng)


def fit(*args, **kwargs):
    drawn.clear()
    result = real_fit(*args, **kwargs)
    print('validation plans drawn in fit:', drawn.count(False))
    return result


pipeline.ChunkSource.plan, train_module._fit = plan, fit
for state in ('carried', 'zero'):
    code = main([*sys.argv[1:], '--state', state, '--out', sys.argv[-1] + '-' + state])
    if code:
        sys.exit(code)
"""


def test_mirrored_over_two_replicas_trains_both_recipes(tmp_path):
    """One process, two replicas (logical CPUs in place of GPUs): each replica gets half the
    global batch (its own lanes in the carried recipe), both recipes write a bundle that keeps
    the parity contract."""
    bags = drive_bags(tmp_path, count=3, n=30)
    config = tiny_config(tmp_path, epochs=2)
    cmd = [sys.executable, '-P', '-c', MIRRORED_ON_TWO_CPUS, 'train', *map(str, bags)]
    cmd += ['--config', str(config), '--no-logdir', '--distribute', 'mirrored']
    cmd += ['--verbose', '0', '--no-backup', '--out', str(tmp_path / 'bundle')]
    done = subprocess.run(cmd, env=ros_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('worker 0 of 1 (chief), 2 replica(s) here') == 2, done.stdout
    assert done.stdout.count('4 per replica of the global batch 8') == 2
    assert 'validation plans drawn in fit: 2' in done.stdout, done.stdout  # 2 epochs
    for state in ('carried', 'zero'):
        out = tmp_path / f'bundle-{state}'
        metrics = load_bundle(out).metadata['metrics']
        assert metrics['epochs_run'] == 2 and metrics['training_state'] == state
        report = evaluate_bundle(out, bags[:1])
        assert report.parity is not None and report.parity.max_abs_diff <= 1e-5
