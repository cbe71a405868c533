"""comparison.accuracy: the hold-out split, the figures against FP32, the gates; and
comparison.sensitivity's greedy fallback (pure logic, on made-up measurements)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwt_deploy.comparison.accuracy import Accuracy, AccuracyGates, HoldOut, holdout_size, holdout_split, measure
from qwt_deploy.comparison.sensitivity import greedy_fallback
from qwt_deploy.errors import QwtError


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 5000), fraction=st.floats(0.01, 0.9), minimum=st.integers(1, 100), seed=st.integers(0, 2**31))
def test_holdout_split_is_disjoint_complete_and_sized(n, fraction, minimum, seed):
    h = HoldOut(fraction=fraction, minimum=minimum)
    cal, held = holdout_split(n, h, seed)
    assert not set(cal) & set(held)  # disjoint
    assert sorted(set(cal) | set(held)) == list(range(n))  # together, every sample once
    assert len(held) == holdout_size(n, h)
    if len(held):
        assert len(held) >= minimum and len(held) >= math.ceil(fraction * n) - 1e-9 and len(cal) >= minimum
        assert len(held) == max(minimum, math.ceil(fraction * n))
    else:  # nothing held out only when holding out would leave fewer than `minimum` to calibrate on
        assert n - max(minimum, math.ceil(fraction * n)) < minimum
    again = holdout_split(n, h, seed)  # seeded: the same split every time
    assert np.array_equal(again[1], held)


def test_default_holdout_is_ten_percent_at_least_32():
    assert holdout_size(512) == 52 and holdout_size(200) == 32 and holdout_size(64) == 32
    assert holdout_size(63) == 0 and holdout_size(10) == 0
    with pytest.raises(QwtError):
        HoldOut(fraction=1.5)


def test_measure_identical_and_known_figures():
    rng = np.random.default_rng(0)
    fp32 = rng.normal(0, 3, (50, 10)).astype(np.float32)
    same = measure(fp32, fp32.copy())
    assert same.top1_agreement == 1.0 and abs(same.kl) < 1e-12 and same.cosine == pytest.approx(1.0)
    assert same.sqnr_db == float("inf") and same.kind == "classes"
    noisy = fp32 + rng.normal(0, 0.3, fp32.shape).astype(np.float32)  # noise power 0.09 vs signal 9: 20 dB
    m = measure(fp32, noisy, labels=fp32.argmax(1))
    assert 18.5 < m.sqnr_db < 21.5 and 0 < m.kl and m.cosine < 1
    assert m.fp32_top1 == 1.0 and m.int8_top1 == m.top1_agreement  # labels = FP32's own argmax
    flipped = fp32.copy()
    flipped[:5] = -flipped[:5]  # 5 of 50 rows get another argmax
    assert measure(fp32, flipped).top1_agreement == pytest.approx(0.9)
    with pytest.raises(QwtError, match="labels"):
        measure(fp32, noisy, labels=np.zeros(3, int))


def test_embeddings_get_no_top1_or_kl_and_reject_those_gates():
    rng = np.random.default_rng(1)
    e = rng.normal(0, 1, (20, 16))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    m = measure(e, e * 0.99 + 0.001)
    assert m.kind == "embedding" and m.top1_agreement is None and m.kl is None and m.cosine > 0.99
    with pytest.raises(QwtError, match="--min-cosine"):
        AccuracyGates(min_agreement=0.9).check_kind(m.kind)


def _acc(agree, kl, cos=0.999):
    return Accuracy(samples=100, source="t", kind="classes", top1_agreement=agree, kl=kl, cosine=cos, sqnr_db=30.0)


def test_gates_name_what_missed():
    g = AccuracyGates(min_agreement=0.99, max_kl=0.01, min_cosine=0.999)
    missed = g.missed(_acc(0.95, 0.02, 0.99))
    assert len(missed) == 3
    assert "top-1 agreement with FP32 0.9500 < --min-agreement 0.99" in missed[0]
    assert "--max-kl 0.01" in missed[1] and "--min-cosine 0.999" in missed[2]
    assert g.missed(_acc(0.995, 0.005, 0.9995)) == [] and g.met(_acc(0.995, 0.005, 0.9995))
    assert not AccuracyGates().any and AccuracyGates(max_kl=0.1).any
    for bad in (dict(min_agreement=1.5), dict(max_kl=-1.0), dict(min_cosine=float("nan"))):
        with pytest.raises(QwtError):
            AccuracyGates(**bad)


def test_greedy_fallback_adds_layers_in_rank_order_until_met():
    # each float layer wins back a known share of agreement; "b" makes things worse
    win = {"a": 0.03, "b": -0.01, "c": 0.02, "d": 0.01}
    calls = []

    def evaluate(layers):
        calls.append(list(layers))
        return _acc(0.94 + sum(win[l] for l in layers), 0.1 - 0.01 * len(layers))

    s = greedy_fallback(evaluate, ["a", "b", "c", "d"], AccuracyGates(min_agreement=0.99), max_float_layers=5)
    assert s.chosen == ["a", "c"] and s.met  # b tried and dropped (worse); d never needed
    assert calls == [[], ["a"], ["a", "b"], ["a", "c"]]
    assert [st.met for st in s.steps] == [False, False, False, True]


def test_greedy_fallback_respects_the_cap_and_reports_not_met():
    s = greedy_fallback(lambda layers: _acc(0.5 + 0.01 * len(layers), 1.0), list("abcdef"),
                        AccuracyGates(min_agreement=0.99), max_float_layers=2)
    assert s.chosen == ["a", "b"] and not s.met


def test_greedy_fallback_needs_nothing_when_already_met():
    s = greedy_fallback(lambda layers: _acc(1.0, 0.0), ["a"], AccuracyGates(max_kl=0.01), max_float_layers=4)
    assert s.chosen == [] and s.met and len(s.steps) == 1


def test_greedy_fallback_stops_after_max_trials():
    calls = []

    def evaluate(layers):
        calls.append(list(layers))
        return _acc(0.5, 1.0)  # nothing ever helps

    s = greedy_fallback(evaluate, list("abcdefgh"), AccuracyGates(min_agreement=0.99), max_float_layers=8,
                        max_trials=3)
    assert s.chosen == [] and not s.met and len(calls) == 4  # the baseline and 3 candidates
