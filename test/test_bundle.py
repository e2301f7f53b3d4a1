"""Bundles: written atomically, loaded only when complete and consistent (DESIGN §3).

Every refusal names the file and the field; a crash while saving leaves the previous bundle
loadable and no temp dirs behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from modelfactory import make_tiny_bundle, tiny_config, tiny_sequence_model

from malpi_ros.errors import BundleError, ConfigError
from malpi_ros.learn import export
from malpi_ros.learn.export import save_bundle
from malpi_ros.runtime import bundle as bundle_mod
from malpi_ros.runtime.bundle import load_bundle


@pytest.fixture(scope='module')
def good(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp('bundles') / 'tiny', seed=0, dt=0.1)


@pytest.fixture
def copy(good, tmp_path) -> Path:
    """A private copy of the good bundle to break."""
    return Path(shutil.copytree(good, tmp_path / 'copy'))


def _edit(path: Path, change) -> None:
    meta = path / 'metadata.json'
    data = json.loads(meta.read_text())
    change(data)
    meta.write_text(json.dumps(data))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith('.'))


def test_round_trip_keeps_config_and_metadata(good):
    b = load_bundle(good)
    assert b.config == tiny_config()
    assert (b.dt, b.seq_len) == (0.1, 10)
    assert b.keras_path == good / 'model.keras' and b.tflite_path == good / 'step.tflite'
    meta = b.metadata
    assert meta['format_version'] == 1
    assert meta['sources'] == [{'path': 'synthetic', 'sha256': '0' * 64}]
    assert meta['metrics']['seed'] == 0
    assert [a['name'] for a in meta['action_table']] == list(b.config.actions.names)
    assert {'malpi_ros', 'keras', 'tensorflow', 'python'} <= set(meta['versions'])
    assert meta['tflite_io']['inputs']['frame']['shape'] == [1, 24, 32, 3]
    assert meta['tflite_io']['outputs']['h_next']['shape'] == [1, 8]
    for name in ('model.keras', 'step.tflite'):
        digest = hashlib.sha256((good / name).read_bytes()).hexdigest()
        assert meta['files'][name]['sha256'] == digest
    assert sorted(p.name for p in good.iterdir()) == [
        'metadata.json',
        'model.keras',
        'step.tflite',
    ]


def test_both_model_files_give_the_same_step(good):
    from malpi_ros.learn.keras_step import KerasStep
    from malpi_ros.runtime.litert import LiteRTStep

    b = load_bundle(good)
    rng = np.random.default_rng(0)
    frame = rng.random((1, 24, 32, 3), dtype=np.float32)
    h = rng.normal(size=(1, 8)).astype(np.float32)
    c = rng.normal(size=(1, 8)).astype(np.float32)
    lite = LiteRTStep(b.tflite_path).run(frame, h, c)
    keras_out = KerasStep.from_file(b.keras_path, b.config.model).run(frame, h, c)
    for got, want in zip(lite, keras_out, strict=True):
        assert np.max(np.abs(got - want)) <= 1e-5
    assert lite[0].shape == (5,) and lite[1].shape == (1, 8)


def test_missing_directory(tmp_path):
    with pytest.raises(BundleError, match='no bundle directory'):
        load_bundle(tmp_path / 'nope')


def test_missing_metadata(copy):
    (copy / 'metadata.json').unlink()
    with pytest.raises(BundleError, match=r'metadata\.json: missing'):
        load_bundle(copy)


def test_invalid_json(copy):
    (copy / 'metadata.json').write_text('{"format": ')
    with pytest.raises(BundleError, match=r'metadata\.json: invalid JSON'):
        load_bundle(copy)


def test_json_that_is_not_an_object(copy):
    (copy / 'metadata.json').write_text('[1, 2]')
    with pytest.raises(BundleError, match='must hold a JSON object, got list'):
        load_bundle(copy)


@pytest.mark.parametrize('field', sorted(bundle_mod._FIELDS))
def test_missing_field(copy, field):
    _edit(copy, lambda d: d.pop(field))
    with pytest.raises(BundleError, match=rf'metadata\.json: field {field}: missing'):
        load_bundle(copy)


@pytest.mark.parametrize(
    ('field', 'value', 'expected'),
    [
        ('dt', '0.1', 'must be int or float, got str'),
        ('dt', True, 'must be int or float, got bool'),
        ('seq_len', 2.5, 'must be int, got float'),
        ('config', [], 'must be dict, got list'),
        ('sources', {}, 'must be list, got dict'),
        ('format_version', 2, 'reads version 1, got 2'),
        ('format', 'other', "must be 'malpi_ros.bundle'"),
        ('dt', 0, 'must be > 0'),
        ('seq_len', 0, 'must be >= 1'),
    ],
)
def test_wrong_type_or_value(copy, field, value, expected):
    _edit(copy, lambda d: d.__setitem__(field, value))
    with pytest.raises(BundleError, match=rf'field {field}: .*{expected}'):
        load_bundle(copy)


@pytest.mark.parametrize('name', ['model.keras', 'step.tflite'])
def test_missing_model_file(copy, name):
    (copy / name).unlink()
    with pytest.raises(BundleError, match=rf'{name}: missing .*field files\.{name}'):
        load_bundle(copy)


@pytest.mark.parametrize('name', ['model.keras', 'step.tflite'])
def test_truncated_model_file(copy, name):
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=rf'{name}: \d+ bytes, .*files\.{name}\.bytes'):
        load_bundle(copy)


@pytest.mark.parametrize('name', ['model.keras', 'step.tflite'])
def test_corrupted_model_file_fails_the_checksum(copy, name):
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf'{name}: sha256 .*files\.{name}\.sha256'):
        load_bundle(copy)
    assert load_bundle(copy, verify=False).path == copy  # the check is what caught it


def _set_units(d):
    d['config']['model']['lstm_units'] = 16


def _set_num_actions(d):
    d['config']['model']['num_actions'] = 4


def _set_preprocess_height(d):
    d['config']['preprocess']['height'] = 48


def _rename_action(d):
    d['action_table'][1]['name'] = 'ahead'


def _unknown_config_key(d):
    d['config']['model']['dropout'] = 0.5


@pytest.mark.parametrize(
    ('change', 'field', 'expected'),
    [
        (_set_units, 'tflite_io.inputs.h.shape', r'\[1, 8\] does not match'),
        (_set_num_actions, 'config', 'model has 4 outputs but the action table has 5'),
        (_set_preprocess_height, 'config', 'preprocess output 48x32x3 does not match'),
        (_rename_action, 'action_table', 'differs from config.actions'),
        (_unknown_config_key, 'config', "unknown keys \\['dropout'\\]"),
    ],
)
def test_inconsistent_config(copy, change, field, expected):
    _edit(copy, change)
    with pytest.raises(BundleError, match=rf'metadata\.json: field {field}: .*{expected}'):
        load_bundle(copy)


def test_crash_while_writing_keeps_the_previous_bundle(good, tmp_path, monkeypatch):
    target = Path(shutil.copytree(good, tmp_path / 'b'))
    before = (target / 'metadata.json').read_bytes()
    model = tiny_sequence_model(tiny_config(), seed=5)

    def boom(*args, **kwargs):
        raise RuntimeError('simulated crash after model.keras was written')

    monkeypatch.setattr(export, 'export_litert', boom)
    with pytest.raises(RuntimeError, match='simulated crash'):
        save_bundle(target, model, tiny_config(), dt=0.2, seq_len=5)
    assert (target / 'metadata.json').read_bytes() == before
    assert load_bundle(target).dt == 0.1
    assert _leftovers(tmp_path) == []


def test_crash_during_the_swap_restores_the_previous_bundle(good, tmp_path, monkeypatch):
    """The fallback swap (no renameat2): a failed second rename puts the old bundle back."""
    target = Path(shutil.copytree(good, tmp_path / 'b'))
    model = tiny_sequence_model(tiny_config(), seed=5)
    real_rename = Path.rename
    monkeypatch.setattr(bundle_mod, '_exchange', lambda a, b: False)

    def rename(self, dest):
        if '.tmp-' in self.name:  # the new bundle moving in: the old one is already aside
            assert not target.exists()
            raise OSError('simulated crash while renaming')
        return real_rename(self, dest)

    monkeypatch.setattr(Path, 'rename', rename)
    with pytest.raises(OSError, match='simulated crash'):
        save_bundle(target, model, tiny_config(), dt=0.2, seq_len=5)
    assert load_bundle(target).dt == 0.1
    assert _leftovers(tmp_path) == []


def test_save_replaces_a_bundle_and_leaves_nothing_behind(good, tmp_path):
    target = Path(shutil.copytree(good, tmp_path / 'b'))
    model = tiny_sequence_model(tiny_config(), seed=5)
    report = tmp_path / 'work' / 'history.csv'
    report.parent.mkdir()
    report.write_text('epoch,loss\n1,0.5\n')
    save_bundle(
        target,
        model,
        tiny_config(),
        dt=0.25,
        seq_len=7,
        metrics={'val_acc': 0.5},
        extra_files={'history.csv': report},
    )
    b = load_bundle(target)
    assert (b.dt, b.seq_len, b.metadata['metrics']) == (0.25, 7, {'val_acc': 0.5})
    assert (target / 'history.csv').read_text() == report.read_text()
    digest = hashlib.sha256(report.read_bytes()).hexdigest()
    assert b.metadata['extra_files'] == {'history.csv': {'sha256': digest, 'bytes': 17}}
    assert b.metadata['files'] != load_bundle(good).metadata['files']
    assert _leftovers(tmp_path) == []


def test_save_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path):
    precious = tmp_path / 'home'
    precious.mkdir()
    (precious / 'notes.txt').write_text('keep me')
    with pytest.raises(BundleError, match='not a bundle'):
        save_bundle(precious, None, tiny_config(), dt=0.1, seq_len=1)
    assert (precious / 'notes.txt').read_text() == 'keep me'


@pytest.mark.parametrize(
    ('kwargs', 'expected'),
    [
        ({'dt': 0.0}, 'dt must be'),
        ({'dt': float('nan')}, 'dt must be'),
        ({'seq_len': 0}, 'seq_len must be'),
        ({'metrics': {'loss': float('nan')}}, 'not JSON-serializable'),
        ({'sources': ['bag.mcap']}, 'sources must be a list of dicts'),
        ({'extra_files': {'step.tflite': __file__}}, 'plain file name other than'),
        ({'extra_files': {'../x.txt': __file__}}, 'plain file name other than'),
        ({'extra_files': {'x.txt': '/nonexistent/x.txt'}}, 'is not a file'),
    ],
)
def test_save_checks_its_arguments_before_writing(tmp_path, kwargs, expected):
    args = {'dt': 0.1, 'seq_len': 5, **kwargs}
    with pytest.raises(ConfigError, match=expected):
        save_bundle(tmp_path / 'b', None, tiny_config(), **args)
    assert list(tmp_path.iterdir()) == []


def test_export_check_catches_a_model_that_differs(good):
    from malpi_ros.learn.model import build_step_model
    from malpi_ros.runtime.litert import LiteRTStep

    other = build_step_model(tiny_config().model, tiny_sequence_model(tiny_config(), seed=9))
    runtime = LiteRTStep(load_bundle(good).tflite_path)
    with pytest.raises(BundleError, match='differs from Keras'):
        export.verify_litert(other, runtime)


def test_keras_runtime_loads_in_safe_mode_only(tmp_path):
    import keras

    from malpi_ros.learn.keras_step import KerasStep

    inputs = keras.Input((None, 24, 32, 3))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    path = tmp_path / 'lambda.keras'
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(BundleError, match='cannot load the Keras model'):
        KerasStep.from_file(path, tiny_config().model)


def test_a_file_that_is_not_litert_is_refused(tmp_path):
    from malpi_ros.runtime.litert import LiteRTStep

    path = tmp_path / 'junk.tflite'
    path.write_bytes(b'not a flatbuffer' * 10)
    with pytest.raises(BundleError, match='not a loadable LiteRT model'):
        LiteRTStep(path)


def test_factory_takes_other_sizes_and_action_tables(tmp_path):
    from malpi_ros.config import Action, ActionTable
    from malpi_ros.runtime.policy import Policy

    table = ActionTable(
        actions=(Action('stop', 0.0, 0.0), Action('go', 0.3, 0.0), Action('spin', 0.0, 1.0))
    )
    path = make_tiny_bundle(tmp_path / 'small', seed=2, height=16, width=20, actions=table, dt=0.2)
    b = load_bundle(path)
    assert b.config.actions == table and b.config.model.input_shape == (16, 20, 3)
    assert b.metadata['tflite_io']['outputs']['probs']['shape'] == [1, 3]
    result = Policy.from_bundle(path).step(np.zeros((30, 40, 3), np.uint8))
    assert result.probabilities.shape == (3,) and result.action_name in table.names


def test_an_edited_metadata_json_fails_its_checksum(copy):
    """A hand-edited dt loads no more: metadata.json's own sha256 covers it."""
    _edit(copy, lambda d: d.__setitem__('dt', 0.2))
    with pytest.raises(
        BundleError, match=r'metadata\.json: field metadata_sha256: does not match'
    ):
        load_bundle(copy)


def test_a_bundle_from_before_metadata_checksums_says_to_train_again(copy):
    _edit(copy, lambda d: d.pop('metadata_sha256'))
    with pytest.raises(BundleError, match=r'metadata_sha256: missing \(a bundle saved before'):
        load_bundle(copy)


@pytest.mark.parametrize(
    ('content', 'expected'),
    [
        (b'{"format": "malpi_ros.bundle", "x": "\xff\xfe"}', 'not UTF-8 text'),
        (b'[' * 200_000 + b']' * 200_000, 'nested too deeply'),
    ],
    ids=['not-utf8', 'deeply-nested'],
)
def test_unreadable_metadata_is_one_line_from_evaluate(copy, tmp_path, capsys, content, expected):
    from bagfactory import synthetic_drive, write_bag

    from malpi_ros.cli import main

    drive = synthetic_drive(20, dt=0.1, seed=1)
    bag = write_bag(tmp_path / 'bag', frames=drive.frames, commands=drive.commands)
    (copy / 'metadata.json').write_bytes(content)
    with pytest.raises(BundleError, match=expected):
        load_bundle(copy)
    assert main(['evaluate', '--no-parity', str(copy), str(bag)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and str(copy / 'metadata.json') in err[0], err


STEPS = ['created', 'model-files', 'extra-files', 'metadata', 'swapped', 'cleaned']


@pytest.mark.parametrize('exchange', [True, False], ids=['renameat2', 'fallback'])
def test_every_step_of_a_save_leaves_a_loadable_bundle(good, tmp_path, monkeypatch, exchange):
    """At each step of a save the disk is looked at (load) and copied as a kill -9 there would
    leave it; each copy, loaded and saved over as the next run would, gives a complete bundle
    (the old or the new) and no leftovers. With renameat2 --out is never absent; the fallback
    has one step ('old-aside') where it is, and a load repairs it."""
    if not exchange:
        monkeypatch.setattr(bundle_mod, '_exchange', lambda a, b: False)
    work = tmp_path / 'work'
    work.mkdir()
    target = Path(shutil.copytree(good, work / 'b'))
    model = tiny_sequence_model(tiny_config(), seed=5)
    snapshots: dict[str, Path] = {}
    absent: list[str] = []

    def checkpoint(step: str) -> None:
        try:
            assert load_bundle(target, recover=False).dt in (0.1, 0.2)
        except BundleError:
            absent.append(step)
        snapshots[step] = Path(shutil.copytree(work, tmp_path / f'crash-{step}'))

    monkeypatch.setattr(bundle_mod, 'checkpoint', checkpoint)
    save_bundle(target, model, tiny_config(), dt=0.2, seq_len=5)
    expected = STEPS if exchange else [*STEPS[:4], 'old-aside', *STEPS[4:]]
    assert list(snapshots) == expected
    assert absent == ([] if exchange else ['old-aside'])
    assert load_bundle(target).dt == 0.2 and _leftovers(work) == []

    monkeypatch.setattr(bundle_mod, 'checkpoint', lambda step: None)
    for step, crashed in snapshots.items():
        leftovers = _leftovers(crashed)
        assert leftovers or step == 'cleaned', step  # a kill there leaves a temp dir
        dt = load_bundle(crashed / 'b').dt  # the next run's load
        assert dt == (0.2 if step in ('old-aside', 'swapped', 'cleaned') else 0.1), step
        save_bundle(crashed / 'b', model, tiny_config(), dt=0.3, seq_len=5)  # the next save
        assert load_bundle(crashed / 'b').dt == 0.3
        assert _leftovers(crashed) == [], step


def test_a_running_save_keeps_its_temp_dir_and_a_dead_ones_is_removed(good, tmp_path):
    target = Path(shutil.copytree(good, tmp_path / 'b'))
    running = tmp_path / f'.b.tmp-{os.getppid()}-0123456789ab'  # a live process: pytest's parent
    dead = tmp_path / '.b.tmp-999999999-0123456789ab'  # no such pid
    old_style = tmp_path / '.b.old-0123456789ab'  # from before pids were in the name
    for leftover in (running, dead, old_style):
        leftover.mkdir()
    removed = bundle_mod.recover_leftovers(target)
    assert running.exists() and not dead.exists() and not old_style.exists()
    assert sorted(removed) == sorted([f'removed {dead.name}', f'removed {old_style.name}'])
