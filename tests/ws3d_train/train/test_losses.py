"""Loss terms of ws3d_train.train.losses on toy inputs with known values, and against slow references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.schema import IGNORE_INDEX
from ws3d_train.train.losses import (
    boundary_bce,
    distill_kl,
    energy_loss,
    energy_terms,
    region_boundaries,
    region_boundary_targets,
    region_contrast,
    region_contrast_pooled,
    segment_cosine,
    segment_mean,
    segment_pseudo_labels,
    stage_segment_mean,
    supervised_ce,
    view_infonce,
    voxel_neighbour_edges,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- segment_mean --------------------------------------------------------------------------------


def test_segment_mean_matches_loop_and_ignores_negative() -> None:
    x = torch.randn(50, 3, dtype=torch.float64)
    seg = torch.randint(-1, 6, (50,))
    seg[seg == 4] = 5  # segment 4 stays empty
    mean, count = segment_mean(x, seg, 7)
    for s in range(7):
        rows = x[seg == s]
        assert count[s] == rows.shape[0]
        expected = rows.mean(0) if rows.shape[0] else torch.zeros(3, dtype=x.dtype)
        torch.testing.assert_close(mean[s], expected)


def test_segment_mean_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        segment_mean(torch.zeros(3, 2), torch.tensor([0, 1, 5]), 3)


# --- pre-training ----------------------------------------------------------------------------------


def _views(num_views: int, per_view: int, dim: int):
    """Views that each see their own block of points, and random targets."""
    n = num_views * per_view
    view_ptr = torch.arange(0, n + 1, per_view)
    view_point_idx = torch.randperm(n)
    target = torch.randn(num_views, dim)
    return n, view_ptr, view_point_idx, target


def test_view_infonce_lower_when_views_match_targets() -> None:
    n, view_ptr, idx, target = _views(6, 10, 16)
    matched = torch.zeros(n, 16)
    for v in range(6):
        matched[idx[view_ptr[v] : view_ptr[v + 1]]] = target[v] + 0.05 * torch.randn(10, 16)
    shuffled = torch.zeros(n, 16)
    for v in range(6):
        shuffled[idx[view_ptr[v] : view_ptr[v + 1]]] = target[(v + 1) % 6]
    good = view_infonce(matched, view_ptr, idx, target, 0.07)
    bad = view_infonce(shuffled, view_ptr, idx, target, 0.07)
    rand = view_infonce(torch.randn(n, 16), view_ptr, idx, target, 0.07)
    assert good < 0.05
    assert good < rand < bad


def test_view_infonce_hand_value_and_empty_view() -> None:
    # two orthogonal targets, pooled embeddings equal to them: logits diag 1/T, off-diag 0
    target = torch.eye(2, 4)
    point_clip = torch.cat([target[0:1].repeat(3, 1), target[1:2].repeat(2, 1)])
    view_ptr = torch.tensor([0, 3, 5, 5])  # third view sees nothing and is left out
    idx = torch.arange(5)
    target3 = torch.cat([target, torch.randn(1, 4)])
    temperature = 0.5
    loss = view_infonce(point_clip, view_ptr, idx, target3, temperature)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_segment_cosine_values() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    assert segment_cosine(a, t, torch.tensor([True, False, False])).item() == pytest.approx(0.0, abs=1e-7)
    assert segment_cosine(a, t, torch.tensor([True, True, False])).item() == pytest.approx(0.5)
    assert segment_cosine(a, t, torch.tensor([False, False, True])).item() == pytest.approx(2.0)
    zero = segment_cosine(a.requires_grad_(), t, torch.zeros(3, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad


def test_distill_kl_zero_for_identical_and_matches_manual() -> None:
    text = torch.randn(5, 8)
    teacher = torch.randn(4, 8)
    seen = torch.tensor([True, True, False, True])
    same = distill_kl(teacher * 3.0, teacher, text, seen, 0.1)  # scale does not change the cosine
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(4, 8)
    loss = distill_kl(student, teacher, text, seen, 0.1)
    tn = F.normalize(text, dim=1)
    manual = 0.0
    for s in torch.nonzero(seen).flatten():
        p = torch.softmax(F.normalize(teacher[s], dim=0) @ tn.T / 0.1, 0)
        q = torch.softmax(F.normalize(student[s], dim=0) @ tn.T / 0.1, 0)
        manual += float((p * (p.log() - q.log())).sum())
    assert loss.item() == pytest.approx(manual / 3, rel=1e-5)
    assert loss.item() > 0


# --- fine-tuning -----------------------------------------------------------------------------------


def test_supervised_ce_ignores_unlabelled_and_is_zero_when_empty() -> None:
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, IGNORE_INDEX, 3, IGNORE_INDEX, 1, 2])
    keep = labels != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(supervised_ce(logits, labels), expected)
    none = supervised_ce(logits, torch.full((6,), IGNORE_INDEX))
    assert none.item() == 0.0
    none.backward()
    assert torch.isfinite(logits.grad).all()


def test_boundary_bce_hand_value() -> None:
    logit = torch.tensor([0.0, 2.0, -1.0, 0.5])
    target = torch.tensor([1.0, 0.0, 1.0, 0.25])
    w = torch.tensor([1.0, 1.0, 0.2, 0.2])
    bce = [math.log(2.0), math.log1p(math.exp(2.0)), math.log1p(math.exp(1.0)),
           -(0.25 * math.log(1 / (1 + math.exp(-0.5))) + 0.75 * math.log(1 - 1 / (1 + math.exp(-0.5))))]
    expected = (bce[0] + bce[1] + 0.2 * bce[2] + 0.2 * bce[3]) / 2.4
    assert boundary_bce(logit, target, w).item() == pytest.approx(expected, rel=1e-6)
    # every weight zero: nothing to learn from, a zero, not NaN
    zero = boundary_bce(logit, target, torch.zeros(4))
    assert zero.item() == 0.0


def _line(n: int = 10):
    """A line of n voxels in two segments (left half 0, right half 1), edges between neighbours."""
    edges = torch.stack([torch.arange(n - 1), torch.arange(1, n)], dim=1)
    seg = (torch.arange(n) >= n // 2).long()
    return edges, seg


def test_region_boundaries_by_hand() -> None:
    # segments 0 | 1 | 2 along a line, voxels 0-1 | 2-3 | 4; interfaces (1,2) and (3,4)
    edges = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4]])
    seg = torch.tensor([0, 0, 1, 1, 2])
    b = torch.tensor([0.0, 0.8, 0.6, 0.2, 0.4])
    r = region_boundaries(b, seg, edges, 4)
    assert r.pairs.tolist() == [[0, 1], [1, 2]]
    assert r.prob.tolist() == pytest.approx([0.7, 0.3])
    assert r.edge_pair.tolist() == [-1, 0, -1, 1]
    assert r.segment_score.tolist() == pytest.approx([0.7, 0.7, 0.3, 0.0])  # segment 3 has no voxel


def test_energy_zero_for_constant_predictions() -> None:
    edges, seg = _line(20)
    prob = torch.tensor([0.2, 0.5, 0.3]).repeat(20, 1)
    agreement, confidence = energy_terms(prob, torch.rand(20), edges, seg, 2)
    assert agreement.item() == 0.0 and confidence.item() > 0  # not confident
    one_hot = F.one_hot(torch.full((20,), 1), 3).float()
    assert energy_loss(one_hot, torch.rand(20), edges, seg, 2, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_energy_hand_value() -> None:
    # two voxels in two segments: B = (b0 + b1) / 2 on their one edge
    prob = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    edges = torch.tensor([[0, 1]])
    seg = torch.tensor([0, 1])
    agreement, confidence = energy_terms(prob, torch.tensor([0.2, 0.4]), edges, seg, 2)
    assert agreement.item() == pytest.approx((1 - 0.3) * 0.5)
    # both segments score 0.3: the entropy mean over both voxels, (0 + log 2) / 2
    assert confidence.item() == pytest.approx(math.log(2) / 2, rel=1e-5)
    # inside one segment the pull is whole, whatever the boundary network says
    agreement, confidence = energy_terms(prob, torch.tensor([0.9, 0.9]), edges, torch.tensor([0, 0]), 1)
    assert agreement.item() == pytest.approx(0.5)
    assert confidence.item() == 0.0  # a lone segment is no boundary region


def test_energy_finite_difference_gradients() -> None:
    gen = torch.Generator().manual_seed(2)
    n, c = 12, 3
    coords = torch.stack([torch.zeros(n), torch.arange(n) % 4, torch.arange(n) // 4, torch.zeros(n)], 1).long()
    edges = voxel_neighbour_edges(coords)
    seg = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 2, -1])
    b = torch.rand(n, generator=gen, dtype=torch.float64)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64, requires_grad=True)

    def agreement(x):
        return energy_terms(torch.softmax(x, 1), b, edges, seg, 3)[0]

    def confidence(x):
        return energy_terms(torch.softmax(x, 1), b, edges, seg, 3)[1]

    assert torch.autograd.gradcheck(agreement, (logits,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(confidence, (logits,), eps=1e-6, atol=1e-6)
    # the boundary probabilities are constants of the energy (the BCE alone trains them)
    b_grad = b.clone().requires_grad_()
    energy_loss(torch.softmax(logits, 1), b_grad, edges, seg, 3).backward()
    assert b_grad.grad is None and logits.grad is not None


def test_energy_without_boundaries_is_plain_smoothing_and_no_confidence() -> None:
    edges, seg = _line(10)
    logits = torch.randn(10, 3, requires_grad=True)
    prob = torch.softmax(logits, 1)
    agreement, confidence = energy_terms(prob, torch.zeros(10), edges, seg, 2)
    plain = (prob[edges[:, 0]] - prob[edges[:, 1]]).pow(2).sum(1).mean()
    assert agreement.item() == pytest.approx(plain.item(), rel=1e-6)
    assert confidence.item() == 0.0
    confidence.backward()
    assert logits.grad is None or logits.grad.abs().sum() == 0


def test_energy_sharpens_boundary_predictions_in_a_two_region_scene() -> None:
    # left segment class 0, right segment class 1, unsure near the border (voxels 4 and 5)
    edges, seg = _line(10)
    margin = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.3, -0.3, -1.0, -2.0, -2.5, -3.0])
    start = torch.stack([margin, -margin], dim=1) / 2

    def descend(b: torch.Tensor, steps: int = 60) -> torch.Tensor:
        logits = start.clone().requires_grad_()
        opt = torch.optim.SGD([logits], lr=1.0)
        for _ in range(steps):
            opt.zero_grad()
            energy_loss(torch.softmax(logits, 1), b, edges, seg, 2, 1.0).backward()
            opt.step()
        return torch.softmax(logits.detach(), 1)

    before = torch.softmax(start, 1)
    border = torch.tensor([4, 5])
    b = torch.zeros(10)
    b[border] = 0.95  # the boundary network sees the border
    after = descend(b)
    assert (after.max(1).values[border] > before.max(1).values[border] + 0.1).all()  # confident there
    assert after[4].argmax() == 0 and after[5].argmax() == 1  # and on the right side of it
    # with no boundary predicted, the pull across the border blurs it instead
    smooth = descend(torch.zeros(10))
    assert (smooth[4] - smooth[5]).abs().sum() < (before[4] - before[5]).abs().sum()
    assert (smooth.max(1).values[border] < after.max(1).values[border]).all()


def test_region_boundary_targets_by_hand() -> None:
    # segments 0 | 1 | 2 | 3 along a line; labels: 0 -> A, 1 -> A, 2 -> B, 3 unknown
    edges = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]])
    seg = torch.tensor([0, 0, 1, 2, 2, 3])
    seg_label = torch.tensor([0, 0, 1, IGNORE_INDEX])
    out = region_boundary_targets(seg_label, seg, edges, 4)
    # interface 0|1 agrees (0), 1|2 differs (1, voxel 2 takes the max of its two interfaces), 2|3 unknown
    assert out.tolist() == [-1, 0, 1, 1, -1, -1]


def _region_setup(separable: bool):
    """Four segments of two classes, 5 points each; embeddings separable by class or mixed."""
    seg = torch.arange(4).repeat_interleave(5)
    label = torch.tensor([0, 0, 1, 1])
    centres = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    if not separable:
        centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    embed = centres[seg] + 0.05 * torch.randn(20, 2)
    return embed, seg, label


def test_region_contrast_lower_for_separable_embeddings() -> None:
    key = torch.full((4,), -1)
    sep = region_contrast(*_region_setup(True), key, 0.1)
    mixed = region_contrast(*_region_setup(False), key, 0.1)
    assert sep < 0.05 < mixed


def test_region_contrast_hand_value_keys_and_no_positive() -> None:
    # three unit segment embeddings; 0 and 1 share a key (two copies), 2 is alone
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    seg = torch.arange(3)
    label = torch.full((3,), IGNORE_INDEX)
    key = torch.tensor([7, 7, -1])
    t = 0.5
    loss = region_contrast(z, seg, label, key, t)
    # anchor 0: positive 1 (s=0), others {1: 0, 2: 1};  anchor 1: positive 0 (s=0), others {0: 0, 2: 0}
    l0 = -(0.0 - math.log(math.exp(0.0) + math.exp(1.0 / t)))
    l1 = -(0.0 - math.log(2.0))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    none = region_contrast(z.requires_grad_(), seg, label, torch.tensor([1, 2, 3]), t)
    assert none.item() == 0.0 and none.requires_grad


def test_stage_segment_mean_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(5)
    n, m, d, s_count = 200, 17, 3, 9
    feats = torch.randn(m, d, generator=gen, dtype=torch.float64)
    index = torch.randint(0, m, (n,), generator=gen)
    seg = torch.randint(-1, s_count - 1, (n,), generator=gen)  # the last segment stays empty
    mean, count = stage_segment_mean(feats, index, seg, s_count)
    for a in range(s_count):
        rows = sorted({int(index[i]) for i in range(n) if int(seg[i]) == a})  # each coarse voxel once
        assert int(count[a]) == len(rows)
        want = feats[rows].mean(0) if rows else torch.zeros(d, dtype=torch.float64)
        assert torch.allclose(mean[a], want, atol=1e-12)
    # at stride 1 (every voxel its own row) it is the plain segment mean
    plain, _ = segment_mean(feats[index], seg, s_count)
    ident, _ = stage_segment_mean(feats[index], torch.arange(n), seg, s_count)
    assert torch.allclose(plain, ident, atol=1e-12)


def test_region_contrast_pooled_equals_region_contrast() -> None:
    embed, seg, label = _region_setup(False)
    key = torch.tensor([3, 3, -1, -1])
    pooled, count = segment_mean(embed, seg, 4)
    assert region_contrast_pooled(pooled, count > 0, label, key, 0.1).item() == pytest.approx(
        region_contrast(embed, seg, label, key, 0.1).item(), rel=1e-6)


def test_segment_pseudo_labels_respect_gamma_and_majority() -> None:
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, -1, 3])
    labels = torch.tensor([2, 2, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX])
    prob = torch.tensor(
        [
            [0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0],
            [0.95, 0.05, 0.0],  # segment 1: mean max 0.925
            [0.90, 0.10, 0.0],
            [0.80, 0.20, 0.0],  # segment 2: mean max 0.8
            [0.80, 0.20, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    out = segment_pseudo_labels(prob, seg, labels, gamma=0.9, num_segments=5)
    assert out.tolist() == [2, 0, IGNORE_INDEX, 2, IGNORE_INDEX]  # segment 4 has no point
    out = segment_pseudo_labels(prob, seg, labels, gamma=0.75)
    assert out.tolist() == [2, 0, 0, 2]
    out = segment_pseudo_labels(prob, seg, labels, gamma=0.95)
    assert out.tolist() == [2, IGNORE_INDEX, IGNORE_INDEX, 2]


# --- neighbourhoods --------------------------------------------------------------------------------


def test_voxel_neighbour_edges_match_brute_force() -> None:
    gen = torch.Generator().manual_seed(3)
    coords = torch.unique(
        torch.cat([torch.randint(0, 2, (300, 1), generator=gen), torch.randint(-4, 5, (300, 3), generator=gen)], 1),
        dim=0,
    )
    coords = coords[torch.randperm(coords.shape[0], generator=gen)]
    edges = voxel_neighbour_edges(coords)
    brute = set()
    rows = coords.tolist()
    for i, j in itertools.combinations(range(len(rows)), 2):
        a, b = rows[i], rows[j]
        if a[0] == b[0] and sum(abs(u - v) for u, v in zip(a[1:], b[1:])) == 1:
            brute.add((i, j))
    got = [tuple(e) for e in edges.tolist()]
    assert len(got) == len(set(got))
    assert set(got) == brute
    assert all(i < j for i, j in got)


def test_voxel_neighbour_edges_rejects_duplicates() -> None:
    with pytest.raises(ValueError):
        voxel_neighbour_edges(torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]]))
    assert voxel_neighbour_edges(torch.zeros((0, 4), dtype=torch.long)).shape == (0, 2)


# --- gradients -------------------------------------------------------------------------------------


def test_all_losses_have_finite_gradients() -> None:
    n, c, d = 40, 4, 8
    logits = torch.randn(n, c, requires_grad=True)
    embed = torch.randn(n, d, requires_grad=True)
    b_logit = torch.randn(n, requires_grad=True)
    seg = torch.randint(-1, 6, (n,))
    labels = torch.where(torch.rand(n) < 0.3, torch.randint(0, c, (n,)), torch.full((n,), IGNORE_INDEX))
    coords = torch.cat([torch.zeros(n, 1, dtype=torch.long), torch.arange(n)[:, None], torch.zeros(n, 2, dtype=torch.long)], 1)
    edges = voxel_neighbour_edges(coords)
    prob = torch.softmax(logits, 1)
    seg_embed, _ = segment_mean(embed, seg, 6)
    seen = torch.tensor([True, False, True, True, True, True])
    view_ptr = torch.tensor([0, 10, 25, 40])
    total = (
        supervised_ce(logits, labels)
        + boundary_bce(b_logit, torch.randint(0, 2, (n,)).float(), torch.rand(n))
        + energy_loss(prob, torch.sigmoid(b_logit), edges, seg, 6, 0.1)
        + region_contrast(embed, seg, segment_pseudo_labels(prob, seg, labels, num_segments=6), torch.arange(6), 0.1)
        + view_infonce(embed, view_ptr, torch.randperm(n), torch.randn(3, d), 0.07)
        + segment_cosine(seg_embed, torch.randn(6, d), seen)
        + distill_kl(seg_embed, torch.randn(6, d), torch.randn(5, d), seen, 0.07)
    )
    total.backward()
    for t in (logits, embed, b_logit):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert embed.grad.abs().sum() > 0


def _all_losses(device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    n, c, d = 60, 4, 8
    logits = torch.randn(n, c, generator=gen).to(device).requires_grad_()
    embed = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    seg = (torch.arange(n) % 7 - 1).to(device)
    labels = torch.where(torch.arange(n) % 3 == 0, torch.arange(n) % c, torch.full((n,), IGNORE_INDEX)).to(device)
    coords = torch.stack([torch.zeros(n), torch.arange(n) % 10, torch.arange(n) // 10, torch.zeros(n)], 1).long()
    edges = voxel_neighbour_edges(coords.to(device))
    prob = torch.softmax(logits, 1)
    seg_embed, _ = segment_mean(embed, seg, 6)
    seen = torch.ones(6, dtype=torch.bool, device=device)
    targets = torch.randn(6, d, generator=gen).to(device)
    return (
        supervised_ce(logits, labels)
        + boundary_bce(logits[:, 0], (torch.arange(n, device=device) % 2).float(), (torch.arange(n, device=device) % 3) / 2.0)
        + energy_loss(prob, torch.sigmoid(logits[:, 1]), edges, seg, 6, 0.1)
        + region_contrast(embed, seg, segment_pseudo_labels(prob, seg, labels, num_segments=6), torch.arange(6, device=device) % 3, 0.1)
        + view_infonce(embed, torch.tensor([0, 20, 60], device=device), torch.arange(n, device=device), targets[:2], 0.07)
        + segment_cosine(seg_embed, targets, seen)
        + distill_kl(seg_embed, targets, targets[:4], seen, 0.07)
    )


def test_losses_under_bf16_autocast_stay_close_to_float32() -> None:
    full = _all_losses("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _all_losses("cpu")
    assert torch.isfinite(mixed)
    assert mixed.item() == pytest.approx(full.item(), rel=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_on_cuda_match_cpu() -> None:
    cpu = _all_losses("cpu")
    gpu = _all_losses("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = _all_losses("cuda")
    mixed.backward()
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4)
    assert mixed.item() == pytest.approx(cpu.item(), rel=2e-2)
