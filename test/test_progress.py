"""Progress bars: drawn on a terminal, silent in a log or a pipe, and never change the items."""

from __future__ import annotations

import io

from malpi_ros.progress import format_duration, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_with_the_step_and_its_count():
    stream = Terminal()
    assert list(progress(range(5), total=5, desc='reading x', unit='msg', stream=stream)) == [
        0, 1, 2, 3, 4,
    ]  # fmt: skip
    drawn = stream.getvalue()
    assert 'reading x' in drawn and '0/5' in drawn and 'msg' in drawn
    assert drawn.endswith('\r')  # cleared when done: the next line starts clean


def test_a_log_or_a_pipe_gets_nothing():
    stream = io.StringIO()
    assert list(progress(iter('abc'), total=3, desc='evaluating', stream=stream)) == list('abc')
    assert stream.getvalue() == ''


def test_time_left_reads_in_seconds_then_minutes():
    assert format_duration(45.4) == '45 s'
    assert format_duration(89.6) == '90 s'
    assert format_duration(90.0) == '1.5 min' and format_duration(605) == '10.1 min'
