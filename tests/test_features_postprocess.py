"""Box selection modes (fact sheet §4) against naive references; given-box validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mask.features.postprocess import (
    BoxError,
    labels_and_scores,
    max_conf_per_box,
    prepare_given_boxes,
    select_boxes,
)


def iou1(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    area = lambda x: (x[2] - x[0] + 1) * (x[3] - x[1] + 1)  # noqa: E731
    return iw * ih / (area(a) + area(b) - iw * ih)


def naive_max_conf(boxes, probs, t):
    r, c = probs.shape
    mc = np.zeros(r)
    for cls in range(1, c):
        order = sorted(range(r), key=lambda i: -probs[i, cls])
        kept = []
        for i in order:
            if all(iou1(boxes[i], boxes[j]) <= t for j in kept):
                kept.append(i)
        for i in kept:
            mc[i] = max(mc[i], probs[i, cls])
    return mc


def random_case(rng, r=14, c=7, peaked=3.0):
    xy = rng.uniform(0, 60, (r, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (r, 2))], 1)
    logits = rng.normal(0, peaked, (r, c))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return boxes, probs


def test_max_conf_matches_naive(rng):
    for _ in range(5):
        boxes, probs = random_case(rng)
        got = max_conf_per_box(torch.tensor(boxes), torch.tensor(probs), 0.3).numpy()
        np.testing.assert_allclose(got, naive_max_conf(boxes, probs, 0.3), rtol=1e-6)


def naive_select(mc, lo, hi, thr):
    keep = [i for i in range(len(mc)) if mc[i] >= thr]
    by_conf = sorted(range(len(mc)), key=lambda i: (-mc[i], i))
    if len(keep) < lo:
        return by_conf[:lo]
    if len(keep) > hi:
        return by_conf[:hi]
    return keep


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.95])
def test_adaptive_matches_naive(rng, thr):
    boxes, probs = random_case(rng, r=30, peaked=2.0)
    mc = naive_max_conf(boxes, probs, 0.3)
    got = select_boxes(torch.tensor(boxes), torch.tensor(probs), "adaptive", min_boxes=5, max_boxes=12,
                       conf_thresh=thr).tolist()
    assert got == naive_select(mc, 5, 12, thr)
    assert 5 <= len(got) <= 12


def test_adaptive_between_min_and_max_keeps_proposal_order(rng):
    boxes, probs = random_case(rng, r=30, peaked=2.0)
    mc = naive_max_conf(boxes, probs, 0.3)
    thr = float(np.sort(mc)[-8])  # exactly 8 boxes pass
    got = select_boxes(torch.tensor(boxes), torch.tensor(probs), "adaptive", min_boxes=5, max_boxes=12,
                       conf_thresh=thr).tolist()
    assert len(got) == 8 and got == sorted(got)


def test_fixed_gives_exactly_n_sorted_by_conf(rng):
    boxes, probs = random_case(rng, r=50, c=20)
    got = select_boxes(torch.tensor(boxes), torch.tensor(probs), "fixed", num_boxes=36)
    assert len(got) == 36
    mc = max_conf_per_box(torch.tensor(boxes), torch.tensor(probs))
    assert (mc[got][:-1] >= mc[got][1:]).all()
    few = select_boxes(torch.tensor(boxes[:20]), torch.tensor(probs[:20]), "fixed", num_boxes=36)
    assert sorted(few.tolist()) == list(range(20))  # fewer proposals than 36: all of them


def test_given_keeps_everything_in_order():
    b = torch.zeros(5, 4)
    assert select_boxes(b, torch.zeros(5, 3), "given").tolist() == [0, 1, 2, 3, 4]


def test_bad_mode_and_range():
    b, p = torch.zeros(3, 4), torch.zeros(3, 3)
    with pytest.raises(ValueError, match="unknown box mode"):
        select_boxes(b, p, "top10")
    with pytest.raises(ValueError, match="min_boxes=9 exceeds"):
        select_boxes(b, p, "adaptive", min_boxes=9, max_boxes=3)


def test_labels_skip_background():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7]])
    lab, sc = labels_and_scores(probs)
    assert lab.tolist() == [0, 1] and sc.tolist() == pytest.approx([0.05, 0.7])
    assert lab.dtype == np.int32 and sc.dtype == np.float32
    e = labels_and_scores(None)
    assert e[0].shape == (0,) and e[1].shape == (0,)
    assert labels_and_scores(torch.zeros(0, 5))[0].shape == (0,)


def test_given_boxes_clipped_dropped_and_reported():
    boxes = np.array([
        [10, 10, 50, 40],  # fine
        [-20, -5, 30, 200],  # clipped to [0, 0, 30, 99]
        [200, 10, 260, 40],  # entirely right of a 160-wide image
        [20, 20, 20, 60],  # zero width
        [30, 30, 10, 60],  # inverted
        [np.nan, 0, 5, 5],  # non-finite
        [-30, -30, -1, -1],  # entirely above-left
        [150, 90, 170, 120],  # corner overlap, clipped to [150, 90, 159, 99]
    ], dtype=np.float64)
    kept, kidx, didx, reasons = prepare_given_boxes(boxes, (100, 160), source="img7")
    assert kidx.tolist() == [0, 1, 7]
    np.testing.assert_array_equal(kept, [[10, 10, 50, 40], [0, 0, 30, 99], [150, 90, 159, 99]])
    assert kept.dtype == np.float32
    assert didx.tolist() == [2, 3, 4, 5, 6]
    assert "outside" in reasons[0] and "zero or negative" in reasons[1] and "zero or negative" in reasons[2]
    assert reasons[3] == "non-finite coordinates" and "outside" in reasons[4]
    assert sorted(kidx.tolist() + didx.tolist()) == list(range(len(boxes)))


def test_given_boxes_shapes():
    k, ki, di, r = prepare_given_boxes(np.zeros((0, 4)), (10, 10))
    assert k.shape == (0, 4) and ki.shape == (0,) and di.shape == (0,) and r == []
    k, ki, _, _ = prepare_given_boxes([1, 1, 5, 5, 2, 2, 6, 6], (10, 10))  # flat list of 4·K
    assert ki.tolist() == [0, 1]
    with pytest.raises(BoxError, match=r"shape \(K, 4\)"):
        prepare_given_boxes(np.zeros((3, 5)), (10, 10), source="x.jpg")
    with pytest.raises(BoxError, match="not numeric"):
        prepare_given_boxes([["a", "b", "c", "d"]], (10, 10))
