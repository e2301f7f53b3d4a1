"""malpi_ros.learn.metrics: counts and scores checked against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from malpi_ros.errors import MalpiError
from malpi_ros.learn.metrics import (
    agreement,
    classification_metrics,
    confusion_matrix,
    metrics_from_matrix,
)

NAMES = ('stop', 'forward', 'left')


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    labels = [0, 0, 1, 1, 1, 2]
    preds = [0, 1, 1, 1, 2, 0]
    m = confusion_matrix(labels, preds, 3)
    assert m.dtype == np.int64
    assert m.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 0]]
    assert m.sum() == len(labels)


def test_scores_match_a_hand_worked_example():
    # stop: tp 1, predicted 2, support 2; forward: tp 2, predicted 3, support 3;
    # left: tp 0, predicted 1, support 1.
    got = classification_metrics([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 0], NAMES)
    np.testing.assert_allclose(got.precision, [1 / 2, 2 / 3, 0.0])
    np.testing.assert_allclose(got.recall, [1 / 2, 2 / 3, 0.0])
    np.testing.assert_allclose(got.f1, [1 / 2, 2 / 3, 0.0])
    assert got.support.tolist() == [2, 3, 1]
    assert got.predicted.tolist() == [2, 3, 1]
    assert got.accuracy == pytest.approx(3 / 6)
    assert got.macro_recall == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert got.total == 6


def test_precision_and_recall_differ_when_errors_are_one_sided():
    # Everything predicted 'forward': forward has recall 1 but precision 2/4.
    got = classification_metrics([1, 1, 0, 2], [1, 1, 1, 1], NAMES)
    assert got.recall[1] == 1.0
    assert got.precision[1] == pytest.approx(0.5)
    assert got.f1[1] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    # Never predicted: precision 0, not NaN.
    assert got.precision[0] == 0.0 and not np.isnan(got.precision).any()


def test_macro_averages_skip_classes_absent_from_the_labels():
    got = classification_metrics([0, 0, 1], [0, 0, 1], NAMES)  # 'left' never occurs
    assert got.accuracy == 1.0
    assert got.macro_recall == 1.0 and got.macro_precision == 1.0 and got.macro_f1 == 1.0
    assert got.support[2] == 0


def test_empty_input_gives_zeros_not_nan():
    got = classification_metrics([], [], NAMES)
    assert got.total == 0 and got.accuracy == 0.0
    assert got.matrix.shape == (3, 3) and got.matrix.sum() == 0


def test_to_dict_and_table_name_every_action():
    got = classification_metrics([0, 1, 2], [0, 1, 1], NAMES)
    data = got.to_dict()
    assert list(data['per_class']) == list(NAMES)
    assert data['per_class']['left']['support'] == 1
    assert data['confusion']['matrix'] == got.matrix.tolist()
    table = got.format_table()
    for name in NAMES:
        assert name in table
    assert 'accuracy 0.667' in table


@pytest.mark.parametrize(
    ('labels', 'preds', 'message'),
    [
        ([0, 3], [0, 1], 'labels must be in [0, 3)'),
        ([0, 1], [0, -1], 'predictions must be in [0, 3)'),
        ([0, 1], [0], 'differ in length'),
        ([[0, 1]], [[0, 1]], '1-D'),
        ([0.5], [0], 'integer'),
    ],
)
def test_bad_inputs_say_what_was_given(labels, preds, message):
    with pytest.raises(MalpiError, match=message.replace('[', r'\[').replace(')', r'\)')):
        confusion_matrix(labels, preds, 3)


def test_metrics_from_matrix_refuses_a_matrix_of_the_wrong_shape():
    with pytest.raises(MalpiError, match='square'):
        metrics_from_matrix(np.zeros((2, 3), np.int64), NAMES)


def test_agreement_reports_largest_difference_and_action_matches():
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.4, 0.35, 0.25]], np.float32)
    b = a.copy()
    b[2] = [0.3, 0.45, 0.25]  # argmax flips on the last frame
    got = agreement(a, b)
    assert got.frames == 3
    assert got.max_abs_diff == pytest.approx(0.1, abs=1e-6)
    assert got.action_agreement == pytest.approx(2 / 3)
    assert got.disagreements == 1
    same = agreement(a, a)
    assert same.max_abs_diff == 0.0 and same.action_agreement == 1.0
    with pytest.raises(MalpiError, match='one shape'):
        agreement(a, a[:2])
