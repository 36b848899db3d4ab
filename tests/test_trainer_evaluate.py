"""trainer.evaluate (metrics and the decision threshold) and trainer.fit.class_weights: pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from histod.trainer.evaluate import METRIC_KEYS, choose_threshold, metrics, report_text
from histod.trainer.fit import class_weights


def test_metrics_by_hand() -> None:
    y = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.95, 0.55]
    m = metrics(y, p, 0.5)
    # predicted malignant: 0.6 (fp), 0.9, 0.8, 0.7, 0.95, 0.55 (tp 5); 0.4 is a fn
    assert m["confusion_matrix"] == [[3, 1], [1, 5]]
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(5 / 6)
    assert m["roc_auc"] == pytest.approx(22 / 24)  # 24 pairs; 0.6 outranks 0.4 and 0.55
    assert (m["n"], m["n_benign"], m["n_malignant"]) == (10, 4, 6)
    assert set(METRIC_KEYS) <= set(m)


def test_metrics_with_one_class_has_no_auc() -> None:
    m = metrics([0, 0, 0], [0.1, 0.7, 0.2], 0.5)
    assert m["roc_auc"] is None
    assert m["sensitivity"] == 0.0
    assert m["specificity"] == pytest.approx(2 / 3)


def test_threshold_maximises_balanced_accuracy() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0] * 90 + [1] * 10)
    # benign below 0.2, malignant between 0.25 and 0.4: separable, but far below 0.5
    p = np.concatenate([rng.uniform(0.0, 0.2, 90), rng.uniform(0.25, 0.4, 10)])
    t = choose_threshold(y, p)
    assert 0.2 <= t <= 0.25 + 1e-9
    assert metrics(y, p, t)["balanced_accuracy"] == 1.0
    assert metrics(y, p, 0.5)["balanced_accuracy"] == 0.5


def test_threshold_reaches_a_target_sensitivity() -> None:
    rng = np.random.default_rng(1)
    y = np.array([0] * 200 + [1] * 200)
    p = np.concatenate([rng.beta(2, 5, 200), rng.beta(5, 2, 200)])  # overlapping classes
    default = choose_threshold(y, p)
    strict = choose_threshold(y, p, target_sensitivity=0.98)
    assert metrics(y, p, strict)["sensitivity"] >= 0.98
    assert strict < default
    # the highest threshold that reaches the target: a slightly higher one misses it
    higher = min(v for v in p if v > strict)
    assert metrics(y, p, higher + 1e-9)["sensitivity"] < 0.98


def test_threshold_with_one_class_is_half() -> None:
    assert choose_threshold([1, 1], [0.2, 0.9]) == 0.5


def test_report_names_both_classes() -> None:
    text = report_text([0, 1, 1, 0], [0.1, 0.9, 0.4, 0.3], 0.5)
    assert "Benign" in text
    assert "Malignant" in text


def test_class_weights_balance_the_loss() -> None:
    w = class_weights(np.array([0] * 75 + [1] * 25))
    assert w[0] == pytest.approx(100 / 150)
    assert w[1] == pytest.approx(100 / 50)
    assert w[0] * 75 == pytest.approx(w[1] * 25)
    assert class_weights(np.array([0, 1, 0, 1])) == {0: 1.0, 1: 1.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_and_the_report_agree_with_scikit_learn(seed: int) -> None:
    """Without scikit-learn in a serving install, evaluate computes ROC AUC and the report itself: the same
    figures and the same text as scikit-learn, ties and one-sided predictions included."""
    metrics_mod = pytest.importorskip("sklearn.metrics")
    from histod.trainer.evaluate import roc_auc

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300), 1 + seed)  # few distinct values: many ties
    assert roc_auc(y, p) == pytest.approx(metrics_mod.roc_auc_score(y, p), abs=1e-12)
    for threshold in (0.0, 0.3, 0.5, 1.01):  # 0.0 and 1.01: one label only is predicted
        pred = (p >= threshold).astype(np.int64)
        expected = metrics_mod.classification_report(
            y, pred, labels=[0, 1], target_names=["Benign", "Malignant"], digits=4, zero_division=0
        )
        assert report_text(y, p, threshold) == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_and_pr_curves_agree_with_scikit_learn(seed: int) -> None:
    """evaluate's curve plots need no scikit-learn either: the same points and average precision, ties included."""
    metrics_mod = pytest.importorskip("sklearn.metrics")
    from histod.trainer.evaluate import curves

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300), 1 + seed)
    c = curves(y, p)
    fpr, tpr, _ = metrics_mod.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(c["fpr"], fpr, atol=1e-12)
    np.testing.assert_allclose(c["tpr"], tpr, atol=1e-12)
    precision, recall, _ = metrics_mod.precision_recall_curve(y, p)
    np.testing.assert_allclose(c["precision"], precision[:-1][::-1], atol=1e-12)  # without its (1, 0) end point
    np.testing.assert_allclose(c["recall"], recall[:-1][::-1], atol=1e-12)
    assert c["average_precision"] == pytest.approx(metrics_mod.average_precision_score(y, p), abs=1e-12)
