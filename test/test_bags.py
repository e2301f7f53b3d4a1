"""malpi_ros.bagio.reader on real rosbag2 bags written by bagfactory: both storages, raw and jpeg
images, Twist and TwistStamped, single storage files, stamps, hashes and every bad input."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest
from bagfactory import image_msg, mcap_file, synthetic_drive, twist_msg, typestore, write_bag

from malpi_ros.bagio import reader as bags
from malpi_ros.errors import BagError
from malpi_ros.runtime.image import decode

DRIVE = synthetic_drive(20, dt=0.1, start=50.0, seed=3)


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
@pytest.mark.parametrize('compressed', [False, True], ids=['raw', 'jpeg'])
@pytest.mark.parametrize('stamped', [False, True], ids=['twist', 'stamped'])
def test_each_storage_image_and_command_type_reads_back(tmp_path, storage, compressed, stamped):
    path = write_bag(
        tmp_path / 'bag',
        storage=storage,
        frames=DRIVE.frames,
        commands=DRIVE.commands,
        compressed=compressed,
        stamped=stamped,
    )
    summary = bags.summarize(path)
    assert summary.storage == storage
    assert summary.message_count == 40
    image = summary.topic('/camera/image_raw')
    assert image.count == 20
    assert image.first == pytest.approx(50.0) and image.last == pytest.approx(51.9)
    assert image.rate == pytest.approx(10.0)
    assert image.max_gap == pytest.approx(0.1)
    topics = bags.find_topics(summary)
    assert topics == (
        '/camera/image_raw',
        'compressed' if compressed else 'raw',
        '/cmd_vel',
        'twist_stamped' if stamped else 'twist',
    )
    with bags.open_bag(path) as bag:
        frames = list(bag.messages('/camera/image_raw'))
        commands = list(bag.messages('/cmd_vel'))
    assert [t for t, _ in frames] == pytest.approx([t for t, _ in DRIVE.frames])
    for (_, msg), (_, rgb) in zip(frames, DRIVE.frames, strict=True):
        got = decode(msg)
        assert got.shape == (24, 32, 3)
        if compressed:  # jpeg smooths the noise away; the colour bar survives
            bar = slice(10, 14)
            assert np.abs(got[bar].mean((0, 1)) - rgb[bar].mean((0, 1))).max() < 15
            assert np.abs(got.astype(int) - rgb).mean() < 12
        else:
            np.testing.assert_array_equal(got, rgb)
    assert [bags.twist_of(m) for _, m in commands] == [
        (lin, ang) for _, lin, ang in DRIVE.commands
    ]
    assert [t for t, _ in commands] == pytest.approx([t for t, _, _ in DRIVE.commands])


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_a_single_storage_file_opens_like_its_directory(tmp_path, storage):
    path = write_bag(tmp_path / 'bag', storage=storage, frames=DRIVE.frames, commands=[])
    (file,) = bags.storage_files(path)
    assert file.suffix == ('.mcap' if storage == 'mcap' else '.db3')
    alone = tmp_path / f'alone{file.suffix}'
    shutil.copy(file, alone)
    summary = bags.summarize(alone)
    assert summary.topic('/camera/image_raw').count == 20
    assert bags.sha256_of_bag(alone) == bags.sha256_of_bag(path)


def test_receive_time_is_the_default_stamp_and_header_stamps_are_there_on_request(tmp_path):
    # The camera stamps on a clock 1000 s off the recorder's; Twist has no header at all.
    path = write_bag(
        tmp_path / 'bag', frames=DRIVE.frames, commands=DRIVE.commands, header_offset=1000.0
    )
    with bags.open_bag(path) as bag:
        receive = [t for t, _ in bag.messages('/camera/image_raw')]
        header = [t for t, _ in bag.messages('/camera/image_raw', stamp='header')]
        twist_header = [t for t, _ in bag.messages('/cmd_vel', stamp='header')]
        with pytest.raises(BagError, match="got 'camera'"):
            next(bag.messages('/cmd_vel', stamp='camera'))
    assert receive == pytest.approx([t for t, _ in DRIVE.frames])
    assert header == pytest.approx([t + 1000.0 for t, _ in DRIVE.frames])
    assert twist_header == pytest.approx([t for t, _, _ in DRIVE.commands])


def test_header_stamp_zero_means_unset_and_twist_of_passes_nan_through():
    assert bags.header_stamp(image_msg(0.0, DRIVE.frames[0][1])) is None
    assert bags.header_stamp(image_msg(12.5, DRIVE.frames[0][1])) == pytest.approx(12.5)
    assert bags.header_stamp(twist_msg(3.0, 0.1, 0.2)) is None
    lin, ang = bags.twist_of(twist_msg(3.0, float('nan'), 0.5, stamped=True))
    assert np.isnan(lin) and ang == 0.5


def test_nan_commands_are_read_as_recorded(tmp_path):
    path = write_bag(tmp_path / 'bag', frames=[], commands=[(1.0, float('nan'), 0.0), (2, 0.1, 0)])
    with bags.open_bag(path) as bag:
        values = [bags.twist_of(m) for _, m in bag.messages('/cmd_vel')]
    assert np.isnan(values[0][0]) and values[1] == (0.1, 0.0)


def test_sha256_covers_the_recorded_bytes_not_the_name(tmp_path):
    a = write_bag(tmp_path / 'a', frames=DRIVE.frames, commands=DRIVE.commands)
    copy = tmp_path / 'renamed'
    shutil.copytree(a, copy)
    assert bags.sha256_of_bag(copy) == bags.sha256_of_bag(a)
    (copy / 'metadata.yaml').write_text((copy / 'metadata.yaml').read_text() + '\n# note\n')
    assert bags.sha256_of_bag(copy) == bags.sha256_of_bag(a)
    b = write_bag(tmp_path / 'b', frames=DRIVE.frames[:-1], commands=DRIVE.commands)
    assert bags.sha256_of_bag(b) != bags.sha256_of_bag(a)
    assert len(bags.sha256_of_bag(a)) == 64


@pytest.mark.parametrize('single_file', [False, True], ids=['directory', 'mcap-file'])
def test_a_truncated_mcap_is_a_bag_error_naming_the_bag(tmp_path, single_file):
    path = write_bag(tmp_path / 'cut', frames=DRIVE.frames, commands=DRIVE.commands)
    file = mcap_file(path)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    target = file if single_file else path
    with pytest.raises(BagError, match=str(target)):
        bags.summarize(target)


def test_a_corrupt_record_mid_file_is_a_bag_error_naming_bag_and_topic(tmp_path):
    path = write_bag(tmp_path / 'bad', frames=DRIVE.frames, commands=DRIVE.commands)
    file = mcap_file(path)
    data = bytearray(file.read_bytes())
    t, rgb = DRIVE.frames[10]
    payload = bytes(typestore().serialize_cdr(image_msg(t, rgb), 'sensor_msgs/msg/Image'))
    at = data.find(payload)
    assert at > 0
    # The message record's length field (opcode, length u64, channel u16, sequence u32, two
    # u64 times, then the payload): make it absurd.
    data[at - 30 : at - 22] = (1 << 62).to_bytes(8, 'little')
    file.write_bytes(bytes(data))
    with bags.open_bag(path) as bag, pytest.raises(BagError) as err:
        list(bag.messages('/camera/image_raw'))
    assert str(path) in str(err.value) and 'topic /camera/image_raw' in str(err.value)


def test_a_corrupt_sqlite3_bag_is_a_bag_error(tmp_path):
    path = write_bag(tmp_path / 'db', storage='sqlite3', frames=DRIVE.frames, commands=[])
    (file,) = bags.storage_files(path)
    data = bytearray(file.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = b'\xff' * 4096
    file.write_bytes(bytes(data))
    with pytest.raises(BagError, match=f'bag {path}'):
        bags.summarize(path)


def test_not_a_bag_is_a_bag_error_that_says_why(tmp_path):
    with pytest.raises(BagError, match='no such file'):
        bags.open_bag(tmp_path / 'missing')
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(BagError, match=r'no metadata\.yaml'):
        bags.open_bag(empty)
    text = tmp_path / 'notes.txt'
    text.write_text('hello')
    with pytest.raises(BagError, match=r"unknown storage '\.txt'"):
        bags.open_bag(text)
    path = write_bag(tmp_path / 'bag', frames=DRIVE.frames, commands=[])
    (path / 'metadata.yaml').unlink()
    with pytest.raises(BagError, match=r'no metadata.yaml.*bag\.mcap'):
        bags.open_bag(path)
    garbage = tmp_path / 'garbage.mcap'
    garbage.write_bytes(b'\x89MCAP0\r\n' + bytes(100))
    with pytest.raises(BagError, match=str(garbage)):
        bags.summarize(garbage)


def test_find_topics_lists_what_the_bag_has_when_a_topic_is_missing(tmp_path):
    path = write_bag(tmp_path / 'bag', frames=[], commands=DRIVE.commands, image_topic=None)
    summary = bags.summarize(path)
    with pytest.raises(BagError) as err:
        bags.find_topics(summary)
    message = str(err.value)
    assert 'no image topic' in message and str(path) in message
    assert '/cmd_vel: geometry_msgs/msg/Twist (20)' in message


def test_find_topics_ambiguous_named_and_wrong_type(tmp_path):
    second = [
        ('/camera2/image', 'sensor_msgs/msg/Image', t, image_msg(t, rgb))
        for t, rgb in DRIVE.frames
    ]
    path = write_bag(
        tmp_path / 'bag', frames=DRIVE.frames, commands=DRIVE.commands, extra_topics=second
    )
    summary = bags.summarize(path)
    with pytest.raises(BagError, match=r'several image topics.*--image-topic'):
        bags.find_topics(summary)
    topics = bags.find_topics(summary, image_topic='/camera2/image')
    assert topics.image_topic == '/camera2/image' and topics.cmd_topic == '/cmd_vel'
    with bags.open_bag(path) as bag:  # an open bag's index serves as well as a summary
        assert bags.find_topics(bag, image_topic='/camera/image_raw') == (
            '/camera/image_raw',
            'raw',
            '/cmd_vel',
            'twist',
        )
    with pytest.raises(BagError, match=r'command topic /camera2/image is sensor_msgs/msg/Image'):
        bags.find_topics(summary, image_topic='/camera2/image', cmd_topic='/camera2/image')
    with pytest.raises(BagError, match=r'no image topic /nope; it has: /camera/image_raw'):
        bags.find_topics(summary, image_topic='/nope')


def test_a_topic_without_messages_is_named(tmp_path):
    path = write_bag(tmp_path / 'bag', frames=DRIVE.frames, commands=[])
    summary = bags.summarize(path)
    assert summary.topic('/cmd_vel').count == 0 and summary.topic('/cmd_vel').rate is None
    with pytest.raises(BagError, match=r'topic /cmd_vel: no messages'):
        bags.find_topics(summary)


def test_gaps_are_measured_on_receive_times(tmp_path):
    frames = DRIVE.frames[:10] + [(t + 5.0, rgb) for t, rgb in DRIVE.frames[10:]]
    path = write_bag(tmp_path / 'bag', frames=frames, commands=[])
    info = bags.summarize(path).topic('/camera/image_raw')
    assert info.max_gap == pytest.approx(5.1)
    assert info.gaps_over(1.0) == 1 and info.gaps_over(6.0) == 0
    assert info.duration == pytest.approx(6.9)


def test_a_bag_without_some_message_definitions_reads_with_the_default_store(tmp_path):
    # Older recorders stored no definitions; here the Twist one is removed from a sqlite3 bag.
    path = write_bag(
        tmp_path / 'old', storage='sqlite3', frames=DRIVE.frames, commands=DRIVE.commands
    )
    (file,) = bags.storage_files(path)
    db = sqlite3.connect(file)
    db.execute("DELETE FROM message_definitions WHERE topic_type = 'geometry_msgs/msg/Twist'")
    db.commit()
    db.close()
    with bags.open_bag(path) as bag:
        values = [bags.twist_of(m) for _, m in bag.messages('/cmd_vel')]
    assert values == [(lin, ang) for _, lin, ang in DRIVE.commands]


def test_a_rosbag2_directory_named_dot_bag_opens(tmp_path):
    """ROS 1 habit: `drive.bag/` as a rosbag2 directory (rosbags takes any .bag for ROS 1)."""
    path = write_bag(tmp_path / 'drive.bag', frames=DRIVE.frames, commands=DRIVE.commands)
    summary = bags.summarize(path)
    assert summary.message_count == 40 and summary.storage == 'mcap'
    with bags.open_bag(path) as bag:
        assert len(list(bag.messages('/camera/image_raw'))) == 20


def test_a_ros1_bag_names_ros1_and_the_converter(tmp_path):
    from rosbags.rosbag1 import Writer as Ros1Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC)
    path = tmp_path / 'old.bag'
    with Ros1Writer(path) as writer:
        conn = writer.add_connection('/cmd_vel', 'geometry_msgs/msg/Twist', typestore=store)
        twist = store.types['geometry_msgs/msg/Twist']
        vector = store.types['geometry_msgs/msg/Vector3']
        msg = twist(linear=vector(x=0.1, y=0.0, z=0.0), angular=vector(x=0.0, y=0.0, z=0.0))
        writer.write(conn, 1, store.serialize_ros1(msg, 'geometry_msgs/msg/Twist'))
    with pytest.raises(BagError) as err:
        bags.open_bag(path)
    message = str(err.value)
    assert 'a ROS 1 bag' in message and 'rosbags-convert --src' in message, message


def test_several_image_topics_lists_only_the_candidates(tmp_path):
    """On a bag with many topics the error stays short: the image topics, not every topic."""
    noise = [
        (
            f'/noise/t{i}',
            'std_msgs/msg/String',
            50.0,
            typestore().types['std_msgs/msg/String'](data='x'),
        )
        for i in range(40)
    ]
    second = [
        ('/camera2/image', 'sensor_msgs/msg/Image', t, image_msg(t, rgb))
        for t, rgb in DRIVE.frames
    ]
    path = write_bag(
        tmp_path / 'bag',
        frames=DRIVE.frames,
        commands=DRIVE.commands,
        extra_topics=noise + second,
    )
    with pytest.raises(BagError) as err:
        bags.find_topics(bags.summarize(path))
    message = str(err.value)
    assert '/camera/image_raw: sensor_msgs/msg/Image (20)' in message
    assert '/camera2/image: sensor_msgs/msg/Image (20)' in message
    assert '/noise' not in message and '/cmd_vel' not in message, message
