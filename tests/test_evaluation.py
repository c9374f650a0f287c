"""The evaluation measures (cgspn.eval.segmentation) against plain reference computations on random inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgspn.eval.segmentation import LinearSegProbe, mean_iou, train_seg_probe
from cgspn.eval.knn import knn_top1


def test_knn_top1_matches_a_loop_over_the_queries():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(200, 16, generator=g), torch.randn(60, 16, generator=g)
    bank_labels, query_labels = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (60,), generator=g)
    correct = 0
    for q, label in zip(queries.double(), query_labels):
        sims = F.cosine_similarity(bank.double(), q[None], dim=1)
        top = sims.argsort(descending=True)[:7]
        votes = np.zeros(5)
        for i in top:
            votes[bank_labels[i]] += np.exp(sims[i].item() / 0.1)
        correct += int(votes.argmax() == label)
    assert knn_top1(bank, bank_labels, queries, query_labels, k=7, temperature=0.1, chunk=16) == correct / 60


def test_mean_iou_matches_per_class_counts():
    g = torch.Generator().manual_seed(1)
    probe = LinearSegProbe(8, 4).eval()
    features, masks = torch.randn(5, 3, 3, 8, generator=g), torch.randint(0, 3, (5, 12, 12), generator=g)
    with torch.no_grad():
        pred = probe(features, (12, 12)).argmax(1)
    ious = []
    for c in range(4):
        inter = ((pred == c) & (masks == c)).sum().item()
        union = ((pred == c) | (masks == c)).sum().item()
        if union:
            ious.append(inter / union)
    assert mean_iou(probe, features, masks, 4, batch_size=2) == pytest.approx(np.mean(ious))


def test_the_probe_takes_exactly_its_steps_and_learns_a_separable_map(monkeypatch):
    """Features that carry each patch's class (plus noise) -> near-perfect mIoU after the step budget; the
    budget counts optimizer steps, however many images there are (here 3 passes and a part)."""
    g = torch.Generator().manual_seed(2)
    classes, n, h = 3, 10, 4
    labels = torch.randint(0, classes, (n, h, h), generator=g)
    centers = torch.randn(classes, 16, generator=g) * 3
    features = centers[labels] + 0.3 * torch.randn(n, h, h, 16, generator=g)
    masks = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)  # [n, 16, 16]: 4x4 pixels per patch
    calls = []
    forward = LinearSegProbe.forward
    monkeypatch.setattr(LinearSegProbe, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    probe = train_seg_probe(features, masks, classes, steps=130, batch_size=3, lr=0.05)
    assert len(calls) == 130  # 4 batches a pass (3+3+3+1 images)
    monkeypatch.setattr(LinearSegProbe, "forward", forward)
    assert mean_iou(probe, features, masks, classes) > 0.9


def test_mean_iou_leaves_the_ignore_label_out():
    """Pixels labelled `ignore` are not scored (whatever the prediction there) and `ignore` is no class."""
    g = torch.Generator().manual_seed(3)
    probe = LinearSegProbe(8, 4).eval()
    features, masks = torch.randn(4, 3, 3, 8, generator=g), torch.randint(0, 4, (4, 12, 12), generator=g)
    pred = probe(features, (12, 12)).argmax(1)
    keep = masks != 0
    ious = []
    for c in range(1, 4):
        tp = ((pred == c) & (masks == c) & keep).sum().item()
        union = (((pred == c) | (masks == c)) & keep).sum().item()
        if union:
            ious.append(tp / union)
    assert mean_iou(probe, features, masks, 4, ignore=0) == pytest.approx(float(np.mean(ious)))
    relabelled = masks.clone()
    relabelled[~keep] = 0
    assert mean_iou(probe, features, relabelled, 4, ignore=0) == mean_iou(probe, features, masks, 4, ignore=0)


def test_a_label_map_is_framed_like_its_image():
    """preprocess_mask resizes and crops a label map exactly as preprocess frames its image: on an image whose
    right part is white and its map 1 there, the two agree away from the edge, at any size and aspect."""
    from cgspn.data.preprocess import preprocess, preprocess_mask

    for h, w, size in [(60, 90, 28), (90, 60, 56), (37, 41, 112)]:
        mask = np.zeros((h, w), np.uint8)
        mask[:, int(w * 0.6):] = 1
        image = np.repeat(mask[:, :, None] * 255, 3, axis=2).astype(np.uint8)
        bright = preprocess(image, size)[0].mean(0) > 0  # normalized: white > 0 > black
        framed = preprocess_mask(mask, size)
        assert framed.shape == (size, size) and framed.dtype == torch.uint8
        disagree = (bright != framed.bool()).sum(0)  # per column: only the edge column may differ
        assert (disagree > 0).sum() <= 1, (h, w, size)


def test_the_probe_and_miou_leave_mmseg_ignore_255_out():
    """255 (mmseg's ignore) is not scored: the probe trains beside it, and mIoU equals the one on the other
    pixels (a reference confusion over them alone), with and without an ignore label."""
    torch.manual_seed(0)
    features = torch.randn(6, 4, 4, 8)
    masks = torch.randint(0, 3, (6, 16, 16), dtype=torch.uint8)
    masks[:, :5, :5] = 255
    for ignore in (None, 0):
        probe = train_seg_probe(features, masks, 3, steps=5, ignore=ignore)
        pred = probe(features, (16, 16)).argmax(1)
        keep = (masks != 255) & (masks != (255 if ignore is None else ignore))
        truth, guess = masks[keep].long(), pred[keep]
        ious = []
        for c in range(3):
            if c == ignore:
                continue
            inter = ((truth == c) & (guess == c)).sum().item()
            union = ((truth == c) | (guess == c)).sum().item()
            if union:
                ious.append(inter / union)
        assert mean_iou(probe, features, masks, 3, ignore=ignore) == pytest.approx(sum(ious) / len(ious))
