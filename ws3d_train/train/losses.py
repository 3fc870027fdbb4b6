"""Loss functions of pre-training and fine-tuning, as pure differentiable torch functions.

Reads nothing and writes nothing: every function takes tensors and returns a scalar loss (or, for
the helpers, tensors). The training loops pick the terms and weights from their configs.

Conventions shared by every function here:
- points (or voxels) are rows; a row's scene is given by a LongTensor ``batch`` [N] where needed;
- segment ids are global over a batch (already offset so that two scenes never share an id), and
  ``-1`` means "no segment";
- labels are int64 with :data:`pipeline.schema.IGNORE_INDEX` (-100) for "unknown".

Every reduction is vectorised (``index_add`` / ``bincount`` / sorting): no Python loop runs over
points, segments or views. A loss with nothing to average over returns a zero that stays
connected to the graph (``x.sum() * 0``), so a step with, e.g., no labelled point still
back-propagates cleanly (no NaN, no "does not require grad" error, no unused-parameter surprise
under DDP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.schema import IGNORE_INDEX
# the voxel graph and region-level boundaries are shared with inference (which never imports train/)
from ws3d_train.boundaries import RegionBoundaries, region_boundaries, voxel_neighbour_edges

__all__ = [
    "boundary_bce",
    "distill_kl",
    "RegionBoundaries",
    "energy_loss",
    "energy_terms",
    "region_boundaries",
    "region_boundary_targets",
    "region_contrast",
    "region_contrast_pooled",
    "segment_cosine",
    "segment_mean",
    "segment_pseudo_labels",
    "stage_segment_mean",
    "supervised_ce",
    "view_infonce",
    "voxel_neighbour_edges",
]


def _graph_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar zero attached to the autograd graph of ``tensors`` (float ones only)."""
    zero = None
    for t in tensors:
        if t.is_floating_point():
            term = t.sum() * 0.0
            zero = term if zero is None else zero + term
    if zero is None:
        raise ValueError("_graph_zero needs at least one floating-point tensor")
    return zero


def _scaled_cosine(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """[A, B] cosine similarity / temperature in float32, also under bf16 autocast.

    Contrastive logits reach 1/temperature (10 to 15); bf16 would round them to ~0.06.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        return F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T / temperature


# ---------------------------------------------------------------------------------------------
# pooling helpers


def segment_mean(
    x: torch.Tensor, seg: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the rows of ``x`` per segment.

    Args:
        x: [N, D] float features.
        seg: [N] int64 segment id per row in ``[0, num_segments)``; rows with ``seg < 0`` are
            ignored.
        num_segments: S, the number of output rows.

    Returns:
        ``(mean, count)``: mean [S, D] (zeros for empty segments) and count [S] int64 (number of
        rows pooled into each segment). Differentiable with respect to ``x``. Half-precision
        inputs (bf16 autocast) are summed and returned in float32: a segment may pool thousands
        of rows.
    """
    if x.dim() != 2 or seg.shape != x.shape[:1]:
        raise ValueError(f"segment_mean expects x [N,D] and seg [N]; got {tuple(x.shape)}, {tuple(seg.shape)}")
    seg = seg.long()
    if seg.numel() and int(seg.max()) >= num_segments:
        raise ValueError(f"segment id {int(seg.max())} >= num_segments={num_segments}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    keep = seg >= 0
    idx = seg[keep]
    sums = x.new_zeros((num_segments, x.shape[1])).index_add(0, idx, x[keep])
    count = torch.bincount(idx, minlength=num_segments)
    mean = sums / count.clamp(min=1).unsqueeze(1).to(x.dtype)
    return mean, count


# ---------------------------------------------------------------------------------------------
# pre-training (hierarchical 2D-3D alignment)


def view_infonce(
    point_clip: torch.Tensor,
    view_ptr: torch.Tensor,
    view_point_idx: torch.Tensor,
    view_target: torch.Tensor,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Scene-level alignment: each view's pooled 3D embedding against its CLIP view embedding.

    For view v, the 3D embedding is the mean of ``point_clip`` over the rows the view shows
    (``view_point_idx[view_ptr[v]:view_ptr[v+1]]``), L2-normalised. Logits are the cosine
    similarities between the V pooled embeddings and the V normalised targets divided by
    ``temperature``; the loss is the symmetric InfoNCE
    ``(CE(logits, arange) + CE(logits.T, arange)) / 2``: every other view of the batch is a
    negative. Views that show no row are left out; with none left the loss is a graph-attached
    zero (a single view gives exactly 0 as well: it has no negative).

    Args:
        point_clip: [N, D] CLIP-space head output per row.
        view_ptr: [V+1] int64 CSR offsets into ``view_point_idx`` (``view_ptr[0] == 0``).
        view_point_idx: [M] int64 rows of ``point_clip`` visible in each view, view by view.
        view_target: [V, D] CLIP embedding of each view (treated as a constant).
        temperature: softmax temperature.

    Returns:
        Scalar loss.
    """
    num_views = view_target.shape[0]
    if view_ptr.shape != (num_views + 1,):
        raise ValueError(f"view_ptr must be [V+1]={num_views + 1}; got {tuple(view_ptr.shape)}")
    if int(view_ptr[-1]) != view_point_idx.numel():
        raise ValueError(
            f"view_ptr[-1]={int(view_ptr[-1])} does not match len(view_point_idx)={view_point_idx.numel()}"
        )
    lengths = view_ptr[1:] - view_ptr[:-1]
    view_of = torch.repeat_interleave(torch.arange(num_views, device=lengths.device), lengths)
    pooled, count = segment_mean(point_clip[view_point_idx.long()], view_of, num_views)
    seen = count > 0
    if int(seen.sum()) == 0:
        return _graph_zero(point_clip)
    logits = _scaled_cosine(pooled[seen], view_target[seen].detach(), temperature)
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def segment_cosine(
    seg_embed_3d: torch.Tensor, seg_target: torch.Tensor, seen: torch.Tensor
) -> torch.Tensor:
    """Object-level alignment: ``1 - cos(seg_embed_3d, seg_target)`` averaged over seen segments.

    Args:
        seg_embed_3d: [S, D] pooled 3D CLIP-head embedding per segment (see :func:`segment_mean`).
        seg_target: [S, D] CLIP embedding of each segment (constant).
        seen: [S] bool, whether a segment has a CLIP embedding (was visible in some view) and
            appears in the batch.

    Returns:
        Scalar loss in [0, 2]; a graph-attached zero when no segment is seen.
    """
    seen = seen.bool()
    if int(seen.sum()) == 0:
        return _graph_zero(seg_embed_3d)
    cos = F.cosine_similarity(seg_embed_3d[seen], seg_target[seen].detach().to(seg_embed_3d.dtype), dim=1)
    return (1.0 - cos).mean()


def distill_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    text: torch.Tensor,
    seen: torch.Tensor,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Class-distribution distillation ``KL(teacher || student)`` over a text vocabulary.

    Both distributions are ``softmax(cos(embedding, text_c) / temperature)`` over the C classes;
    the teacher (the segment's CLIP embedding) and the text embeddings are constants. The KL is
    summed over classes and averaged over seen segments.

    Args:
        student: [S, D] pooled 3D embedding per segment.
        teacher: [S, D] CLIP embedding per segment.
        text: [C, D] text embedding per class.
        seen: [S] bool, segments to use.
        temperature: softmax temperature shared by both distributions.

    Returns:
        Scalar loss >= 0 (zero when student and teacher point the same way); a graph-attached
        zero when no segment is seen.
    """
    seen = seen.bool()
    if int(seen.sum()) == 0:
        return _graph_zero(student)
    text = text.detach()
    log_p_student = F.log_softmax(_scaled_cosine(student[seen], text, temperature), dim=1)
    log_p_teacher = F.log_softmax(_scaled_cosine(teacher[seen].detach(), text, temperature), dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)
    return kl.mean()


# ---------------------------------------------------------------------------------------------
# fine-tuning with few labels


def supervised_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over labelled rows, ignoring ``IGNORE_INDEX``.

    Args:
        logits: [N, C] class logits.
        labels: [N] int64 in ``[0, C)`` or ``IGNORE_INDEX``.

    Returns:
        Mean cross-entropy over labelled rows; a graph-attached zero (not NaN) when no row is
        labelled.
    """
    labels = labels.long()
    n_labelled = int((labels != IGNORE_INDEX).sum())
    if n_labelled == 0:
        return _graph_zero(logits)
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / n_labelled


def boundary_bce(
    logit: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    *,
    pos_weight: float | None = None,
) -> torch.Tensor:
    """Weighted binary cross-entropy of the boundary network: ``sum(w * bce) / sum(w)``.

    The caller decides each row's target and weight (semantic edges from labels at weight 1,
    weaker region-level and geometric targets below it; see ``ws3d_train.train.finetune``), so the
    scale does not depend on how many rows are labelled.

    Args:
        logit: [N] boundary logits.
        target: [N] float targets in [0, 1] (soft targets allowed).
        weight: [N] float weights >= 0 (0: no target).
        pos_weight: optional weight of the positive part, as in
            ``BCEWithLogitsLoss(pos_weight=...)``; boundaries are a small minority of rows.

    Returns:
        Scalar loss; a graph-attached zero when every weight is zero.
    """
    target = target.to(device=logit.device, dtype=logit.dtype)
    weight = weight.to(device=logit.device, dtype=logit.dtype)
    pw = None if pos_weight is None else logit.new_tensor(float(pos_weight))
    bce = F.binary_cross_entropy_with_logits(logit, target, reduction="none", pos_weight=pw)
    denom = weight.sum()
    if float(denom) <= 0.0:
        return _graph_zero(logit)
    return (weight * bce).sum() / denom


def energy_terms(
    prob: torch.Tensor,
    boundary_prob: torch.Tensor,
    edges: torch.Tensor,
    seg: torch.Tensor,
    num_segments: int,
    *,
    detach_boundary: bool = True,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of the boundary-aware energy: agreement inside regions, confidence at boundaries.

    With region-level boundaries (:func:`region_boundaries`: ``B_ab`` per adjacent segment pair,
    ``r_a = max_b B_ab`` per segment):

    - agreement ``sum_e w_e ||p_i - p_j||^2 / E`` over the voxel edges e = (i, j), with ``w_e = 1``
      inside a segment and ``w_e = 1 - B_ab`` between segments a and b (no pull across a border
      the boundary network calls semantic; edges touching no segment have ``w_e = 0``);
    - confidence ``sum_i r_(seg i) H(p_i) / sum_i r_(seg i)``: the entropy of the prediction on the
      voxels of boundary regions, weighted by how much their region is one (WS3D++'s energy makes
      predictions confident at boundaries, where a smooth network is least sure).

    Args:
        prob: [N, C] class probabilities of the prediction that is evaluated.
        boundary_prob: [N] voxel boundary probability.
        edges: [E, 2] int64 neighbouring voxel pairs.
        seg: [N] int64 global segment id, -1 for none.
        num_segments: S.
        detach_boundary: treat the boundary probabilities as constants (default): otherwise the
            network could lower the agreement term by predicting a boundary everywhere; the
            boundary network is trained by :func:`boundary_bce` alone.
        eps: floor inside the logarithm.

    Returns:
        ``(agreement, confidence)`` scalars; graph-attached zeros where there is nothing to sum.
    """
    b = boundary_prob.detach() if detach_boundary else boundary_prob
    b = b.to(prob.dtype)
    seg = seg.long()
    zero = _graph_zero(prob)
    if edges.numel() == 0 or prob.shape[0] == 0:
        return zero, zero
    regions = region_boundaries(b, seg, edges, num_segments)
    i, j = edges[:, 0].long(), edges[:, 1].long()
    inside = (seg[i] == seg[j]) & (seg[i] >= 0)
    w = torch.where(inside, torch.ones_like(b[i]), torch.zeros_like(b[i]))
    across = regions.edge_pair >= 0
    if regions.prob.numel():
        w = torch.where(across, 1.0 - regions.prob[regions.edge_pair.clamp(min=0)], w)
    # index_select: a deterministic backward on a CPU (see ws3d_train.network)
    agreement = (w * (prob.index_select(0, i) - prob.index_select(0, j)).pow(2).sum(dim=1)).mean()
    r = torch.where(seg >= 0, regions.segment_score[seg.clamp(min=0)], torch.zeros_like(b))
    denom = r.sum()
    if float(denom) <= 0.0:
        return agreement, zero
    entropy = -(prob * prob.clamp(min=eps).log()).sum(dim=1)
    return agreement, (r * entropy).sum() / denom


def energy_loss(
    prob: torch.Tensor,
    boundary_prob: torch.Tensor,
    edges: torch.Tensor,
    seg: torch.Tensor,
    num_segments: int,
    confidence_weight: float = 1.0,
    *,
    detach_boundary: bool = True,
) -> torch.Tensor:
    """Boundary-aware energy: ``agreement + confidence_weight * confidence`` (:func:`energy_terms`)."""
    agreement, confidence = energy_terms(prob, boundary_prob, edges, seg, num_segments, detach_boundary=detach_boundary)
    return agreement + confidence_weight * confidence


def region_boundary_targets(
    seg_label: torch.Tensor, seg: torch.Tensor, edges: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """Per-voxel semantic-boundary targets from segment labels, at segment interfaces.

    A voxel joined by an edge to a voxel of another segment is a target 1 when the two segments
    carry different known labels, 0 when the same (a voxel on several interfaces takes the
    largest); voxels with no interface between two labelled segments are -1 (unknown).

    Args:
        seg_label: [S] int64 label per segment, IGNORE_INDEX unknown.
        seg: [N] int64 global segment id, -1 none.
        edges: [E, 2] int64 neighbouring voxel pairs.
        num_segments: S (rows of ``seg_label``).

    Returns:
        [N] int64 in {-1, 0, 1}.
    """
    n = seg.shape[0]
    out = torch.full((n,), -1, dtype=torch.long, device=seg.device)
    if edges.numel() == 0 or num_segments == 0:
        return out
    seg = seg.long()
    i, j = edges[:, 0].long(), edges[:, 1].long()
    si, sj = seg[i], seg[j]
    ok = (si != sj) & (si >= 0) & (sj >= 0)
    li = torch.where(ok, seg_label[si.clamp(min=0)], torch.full_like(si, IGNORE_INDEX))
    lj = torch.where(ok, seg_label[sj.clamp(min=0)], torch.full_like(sj, IGNORE_INDEX))
    known = ok & (li != IGNORE_INDEX) & (lj != IGNORE_INDEX)
    value = (li != lj).long()[known]
    for side in (i[known], j[known]):
        out = out.scatter_reduce(0, side, value, reduce="amax", include_self=True)
    return out


def region_contrast(
    point_embed: torch.Tensor,
    seg: torch.Tensor,
    seg_label: torch.Tensor,
    seg_key: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Region-level supervised InfoNCE across the segments of a batch.

    Segment embeddings are the mean of ``point_embed`` over each segment's rows, L2-normalised.
    For anchor segment a, the positives P(a) are the other segments with the same known label or
    the same key (the same physical segment in another augmented copy of the scene); the loss is
    the supervised contrastive loss (Khosla et al. 2020, "L_out"):
    ``-1/|P(a)| sum_{p in P(a)} log( exp(s_ap/T) / sum_{k != a} exp(s_ak/T) )``, averaged over
    anchors with at least one positive. Every other present segment (labelled or not) is in the
    denominator. Segments with no rows are left out entirely. Memory is O(S^2).

    Args:
        point_embed: [N, D] per-row embedding.
        seg: [N] int64 global segment id, -1 for none.
        seg_label: [S] int64 label per segment (``IGNORE_INDEX`` when unknown; see
            :func:`segment_pseudo_labels`).
        seg_key: [S] int64 identity of the physical segment, equal for its copies in two
            augmented versions of a scene; negative values never match.
        temperature: softmax temperature tau.

    Returns:
        Scalar loss; a graph-attached zero when no anchor has a positive.
    """
    num_segments = seg_label.shape[0]
    pooled, count = segment_mean(point_embed, seg, num_segments)
    return region_contrast_pooled(pooled, count > 0, seg_label, seg_key, temperature)


def region_contrast_pooled(
    pooled: torch.Tensor,
    present: torch.Tensor,
    seg_label: torch.Tensor,
    seg_key: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """:func:`region_contrast` on segment embeddings already pooled (e.g. per decoder stage by
    :func:`stage_segment_mean`, then projected).

    Args:
        pooled: [S, D] segment embeddings (normalised here).
        present: [S] bool, segments that have rows in the batch (the others are left out).
        seg_label: [S] int64 label or IGNORE_INDEX.
        seg_key: [S] int64 physical segment identity (negative never matches).
        temperature: tau.

    Returns:
        Scalar loss; a graph-attached zero when no anchor has a positive.
    """
    if seg_key.shape != seg_label.shape or pooled.shape[0] != seg_label.shape[0]:
        raise ValueError(f"pooled {tuple(pooled.shape)}, seg_label {tuple(seg_label.shape)} and seg_key "
                         f"{tuple(seg_key.shape)} must have one row per segment")
    present = present.bool()
    if int(present.sum()) < 2:
        return _graph_zero(pooled)
    z = pooled[present]
    label = seg_label.to(z.device)[present].long()
    key = seg_key.to(z.device)[present].long()
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    same_label = (label[:, None] == label[None, :]) & (label[:, None] != IGNORE_INDEX)
    same_key = (key[:, None] == key[None, :]) & (key[:, None] >= 0)
    positive = (same_label | same_key) & ~eye
    n_pos = positive.sum(dim=1)
    anchors = n_pos > 0
    if int(anchors.sum()) == 0:
        return _graph_zero(pooled)
    logits = _scaled_cosine(z, z, temperature)
    # exclude self from the denominator (a large negative, not -inf: 0 * -inf would be NaN below)
    logits = logits.masked_fill(eye, torch.finfo(logits.dtype).min)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos_log_prob = (log_prob * positive.to(log_prob.dtype)).sum(dim=1)
    per_anchor = -pos_log_prob[anchors] / n_pos[anchors].to(log_prob.dtype)
    return per_anchor.mean()


def stage_segment_mean(
    stage_feats: torch.Tensor, stage_index: torch.Tensor, seg: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment embeddings pooled at a decoder stage's own resolution.

    Segment a's embedding is the mean of the stage's voxel features over the distinct stage voxels
    that hold at least one voxel of a (each coarse voxel counted once, however many of a's fine
    voxels it holds; at stride 1 this is :func:`segment_mean`).

    Args:
        stage_feats: [M, D] features of the stage's voxels.
        stage_index: [N] int64 row of ``stage_feats`` holding each (stride-1) voxel's ancestor.
        seg: [N] int64 global segment id per voxel, -1 none.
        num_segments: S.

    Returns:
        ``(mean [S, D], count [S] int64 distinct stage voxels)``; differentiable in ``stage_feats``.
    """
    seg = seg.long()
    keep = seg >= 0
    m = stage_feats.shape[0]
    pair = torch.unique(seg[keep] * m + stage_index.long()[keep])
    return segment_mean(stage_feats.index_select(0, pair % m), pair // m, num_segments)


@torch.no_grad()
def segment_pseudo_labels(
    prob: torch.Tensor,
    seg: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 0.9,
    *,
    num_segments: int | None = None,
) -> torch.Tensor:
    """A label per segment from its labelled rows, or else from a confident mean prediction.

    A segment with labelled rows takes their majority label (ties: the smallest class id).
    Otherwise it takes ``argmax`` of the mean of ``prob`` over its rows when that maximum exceeds
    ``gamma``, and ``IGNORE_INDEX`` when it does not (or when the segment has no rows).

    Args:
        prob: [N, C] class probabilities.
        seg: [N] int64 global segment id, -1 for none.
        labels: [N] int64 label or ``IGNORE_INDEX``.
        gamma: confidence threshold on the mean probability.
        num_segments: S; defaults to ``seg.max() + 1``.

    Returns:
        [S] int64 segment labels (no gradient).
    """
    seg = seg.long()
    labels = labels.long()
    num_classes = prob.shape[1]
    if num_segments is None:
        num_segments = int(seg.max()) + 1 if seg.numel() else 0
    mean_prob, _ = segment_mean(prob.float(), seg, num_segments)
    conf, guess = mean_prob.max(dim=1)
    out = torch.where(conf > gamma, guess, torch.full_like(guess, IGNORE_INDEX))

    labelled = (seg >= 0) & (labels != IGNORE_INDEX)
    if bool(((labels[labelled] < 0) | (labels[labelled] >= num_classes)).any()):
        raise ValueError(f"labels must lie in [0, {num_classes}) or be IGNORE_INDEX")
    votes = torch.bincount(
        seg[labelled] * num_classes + labels[labelled], minlength=num_segments * num_classes
    ).view(num_segments, num_classes)
    has_label = votes.sum(dim=1) > 0
    majority = votes.argmax(dim=1)  # first maximum: ties go to the smallest class id
    return torch.where(has_label, majority, out)
