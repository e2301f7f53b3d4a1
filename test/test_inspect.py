"""`malpi-ros inspect`: text and --json through malpi_ros.cli.main, the installed executable,
--config and --image-topic, and non-zero exits that name the bad bag."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from bagfactory import image_msg, mcap_file, synthetic_drive, write_bag, zero_png
from support import NODE_DIR, ros_env

from malpi_ros.cli import main

NAMES = ('stop', 'forward', 'left', 'right', 'backward')


@pytest.fixture(scope='module')
def drive():
    return synthetic_drive(60, dt=0.1, start=500.0, seed=11)


@pytest.fixture
def bag(tmp_path, drive):
    """60 frames at 10 Hz with one 3 s pause after frame 30; jpeg, TwistStamped."""
    frames = drive.frames[:30] + [(t + 3.0, rgb) for t, rgb in drive.frames[30:]]
    commands = drive.commands[:30] + [(t + 3.0, a, b) for t, a, b in drive.commands[30:]]
    return write_bag(
        tmp_path / 'drive', frames=frames, commands=commands, compressed=True, stamped=True
    )


def _expected_histogram(drive):
    counts = np.bincount(drive.labels, minlength=len(NAMES))
    return {name: int(c) for name, c in zip(NAMES, counts, strict=True)}


def test_text_report_shows_topics_rates_gaps_images_and_labels(bag, drive, capsys):
    assert main(['inspect', str(bag)]) == 0
    out = capsys.readouterr().out
    assert str(bag) in out and 'mcap' in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    image = lines['/camera/image_raw']
    assert image[1:3] == ['sensor_msgs/msg/CompressedImage', '60']
    assert float(image[4]) == pytest.approx(3.1) and image[5] == '1'  # max gap, gaps > 1 s
    assert lines['/cmd_vel'][1:3] == ['geometry_msgs/msg/TwistStamped', '60']
    assert '32x24 jpeg' in out
    hist = _expected_histogram(drive)
    for name, count in hist.items():
        assert f'{name} {count} (' in out
    assert '2 episodes, 2 chunks of 32 frames' in out  # the state carried: one chunk each


def test_json_report_is_one_document_with_the_label_histogram(bag, drive, capsys):
    assert main(['inspect', '--json', str(bag), str(bag)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc['bags']) == 2
    report = doc['bags'][0]
    assert report['error'] is None and report['storage'] == 'mcap'
    assert report['image_topic'] == {'topic': '/camera/image_raw', 'kind': 'compressed'}
    assert report['cmd_topic'] == {'topic': '/cmd_vel', 'kind': 'twist_stamped'}
    assert report['image_formats'] == [
        {'size': '32x24', 'encoding': 'jpeg (compressed)', 'frames': 5}
    ]
    topics = {t['topic']: t for t in report['topics']}
    assert topics['/camera/image_raw']['count'] == 60
    assert topics['/camera/image_raw']['gaps_over'] == 1
    assert topics['/camera/image_raw']['max_gap_s'] == pytest.approx(3.1)
    labels = report['labels']
    assert labels['histogram'] == _expected_histogram(drive)
    # 30 + 30 frames, chunks of 32 frames (the state carried): 1 + 1
    assert (labels['episodes'], labels['windows'], labels['stale']) == (2, 2, 0)
    assert report['duration'] == pytest.approx(8.9 + 0.025, abs=0.01)


def test_config_file_sets_the_labelling_rules(bag, tmp_path, capsys):
    config = tmp_path / 'train.yaml'
    config.write_text(
        'dataset:\n  gap: 5.0\n  state: zero\n  seq_len: 20\n  burn_in: 0\n  stride: 10\n'
        'actions:\n  dead_zone: 0.1\n'
        'train:\n  epochs: 3\n'
    )
    assert main(['inspect', '--json', '--config', str(config), str(bag)]) == 0
    report = json.loads(capsys.readouterr().out)['bags'][0]
    assert report['gap_threshold_s'] == 5.0
    assert {t['gaps_over'] for t in report['topics']} == {0}
    assert (report['labels']['episodes'], report['labels']['windows']) == (1, 5)
    bad = tmp_path / 'bad.yaml'
    bad.write_text('dataset:\n  gap: -1\n')
    assert main(['inspect', '--config', str(bad), str(bag)]) == 1
    err = capsys.readouterr().err
    assert 'bad.yaml' in err and 'gap must be > 0, got -1' in err


def test_image_topic_choice_among_several_cameras(tmp_path, drive, capsys):
    extra = [
        ('/rear/image', 'sensor_msgs/msg/Image', t, image_msg(t, rgb[:12]))
        for t, rgb in drive.frames[:10]
    ]
    path = write_bag(
        tmp_path / 'two', frames=drive.frames, commands=drive.commands, extra_topics=extra
    )
    assert main(['inspect', str(path)]) == 1
    captured = capsys.readouterr()
    assert 'several image topics' in captured.err and '--image-topic' in captured.err
    assert '/rear/image' in captured.out  # the topics are still listed
    assert main(['inspect', '--json', '--image-topic', '/rear/image', str(path)]) == 0
    report = json.loads(capsys.readouterr().out)['bags'][0]
    assert report['image_formats'] == [{'size': '32x12', 'encoding': 'rgb8', 'frames': 5}]
    assert report['labels']['frames'] == 10


def test_bad_bags_exit_non_zero_naming_the_bag(tmp_path, drive, capsys):
    cut = write_bag(tmp_path / 'cut', frames=drive.frames, commands=drive.commands)
    file = mcap_file(cut)
    file.write_bytes(file.read_bytes()[:-300])
    no_cmd = write_bag(tmp_path / 'nocmd', frames=drive.frames, commands=[], cmd_topic=None)
    assert main(['inspect', str(cut), str(no_cmd)]) == 1
    captured = capsys.readouterr()
    assert f'malpi-ros inspect: error: bag {cut}: cannot open' in captured.err
    assert f'bag {no_cmd}: no command topic' in captured.err
    assert '/camera/image_raw: sensor_msgs/msg/Image (60)' in captured.err
    assert main(['inspect', '--json', str(cut)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc['bags'][0]['bag'] == str(cut) and 'cannot open' in doc['bags'][0]['error']


def test_all_nan_commands_are_reported(tmp_path, drive, capsys):
    nan = [(t, float('nan'), 0.0) for t, _, _ in drive.commands]
    path = write_bag(tmp_path / 'nan', frames=drive.frames, commands=nan)
    assert main(['inspect', str(path)]) == 1
    assert 'all 60 commands are NaN' in capsys.readouterr().err


def test_the_installed_executable_runs_inspect(bag, drive):
    out = subprocess.run(
        [str(NODE_DIR / 'malpi-ros'), 'inspect', '--json', str(bag)],
        env=ros_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)['bags'][0]
    assert report['labels']['histogram'] == _expected_histogram(drive)
    help_out = subprocess.run(
        [str(NODE_DIR / 'malpi-ros'), 'inspect', '--help'],
        env=ros_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert 'malpi-ros inspect my_drive_bag/' in help_out.stdout


# The inspect CLI in a child process that reports its own peak RSS and the time main() took.
MEASURED_INSPECT = """
import json, resource, sys, time
from malpi_ros.cli import main
start = time.perf_counter()
code = main(['inspect', '--json', sys.argv[1]])
took = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({'code': code, 'seconds': took, 'peak_rss_mb': rss}), file=sys.stderr)
"""


def _measured_inspect(bag) -> tuple[dict, dict]:
    out = subprocess.run(
        [sys.executable, '-c', MEASURED_INSPECT, str(bag)],
        env=ros_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    measured = json.loads(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout)['bags'][0], measured


def test_a_png_bomb_in_a_bag_is_reported_undecodable_without_decoding_it(tmp_path, drive):
    bomb = zero_png(20000, 20000)  # 390 KB, 400 Mpx
    frames = list(drive.frames)
    plain = write_bag(tmp_path / 'plain', frames=frames, commands=drive.commands, compressed=True)
    frames[0] = (frames[0][0], frames[0][1], {'format': 'png', 'data': bomb})
    bombed = write_bag(tmp_path / 'bomb', frames=frames, commands=drive.commands, compressed=True)
    base_report, base = _measured_inspect(plain)
    report, measured = _measured_inspect(bombed)
    assert base['code'] == measured['code'] == 0
    [refused] = [f for f in report['image_formats'] if f['size'] == 'undecodable']
    assert refused['frames'] == 1
    assert '20000x20000 = 400000000 pixels is over the limit of 16777216' in refused['encoding']
    assert measured['peak_rss_mb'] - base['peak_rss_mb'] < 50
    assert measured['seconds'] < base['seconds'] + 1.0
    assert report['labels'] == base_report['labels']  # labels never needed the pixels


def test_a_bag_without_one_decodable_frame_fails_and_each_error_is_printed_once(
    tmp_path, drive, capsys
):
    broken = [(t, rgb, {'encoding': 'bogus8'}) for t, rgb in drive.frames]
    path = write_bag(tmp_path / 'broken', frames=broken, commands=drive.commands)
    assert main(['inspect', str(path)]) == 1
    captured = capsys.readouterr()
    assert f'bag {path}, topic /camera/image_raw: none of 60 frames could be decoded' in (
        captured.err
    )
    assert captured.err.count('error:') == 1 and 'error' not in captured.out, captured
    assert main(['inspect', str(tmp_path / 'missing')]) == 1
    captured = capsys.readouterr()
    assert captured.err.count('no such file or directory') == 1 and captured.out == ''


def test_inspect_takes_a_dot_bag_directory(tmp_path, drive, capsys):
    path = write_bag(tmp_path / 'drive.bag', frames=drive.frames, commands=drive.commands)
    assert main(['inspect', str(path)]) == 0, capsys.readouterr().err
    assert 'mcap, 120 messages' in capsys.readouterr().out
