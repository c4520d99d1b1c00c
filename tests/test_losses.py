"""losses/: hand-worked values on 2-D embeddings, identities between the losses, limits, float64
gradcheck and stability at temperature 0.01."""
from __future__ import annotations

import math

import pytest
import torch

from losses import (align_uniform_loss, byol_loss, cacr_loss, cacr_multiview_loss, cmc_loss,
                    hard_negative_loss, info_nce, info_nce_from_logits, interclr_loss, nt_xent, nt_xent_global,
                    patch_nce, soft_target_cross_entropy)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# --- hand-worked values ------------------------------------------------------------------------

def test_info_nce_hand_value():
    # cos(q, +) = 0.6, cos(q, negatives) = 0 and -1, τ = 0.5 → logits 1.2, 0, -2
    loss = info_nce(t([1, 0]), t([0.6, 0.8]), t([[0, 1], [-1, 0]]), temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.2) + math.exp(-3.2)))


def test_margin_nce_subtracts_margin_from_positive_in_numerator_and_denominator():
    # Eq. 6 with m = -0.5: positive logit (0.6 + 0.5)/0.5 = 2.2, negatives untouched (0, -2)
    loss = info_nce(t([1, 0]), t([0.6, 0.8]), t([[0, 1], [-1, 0]]), temperature=0.5, margin=-0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.2) + math.exp(-4.2)))


def test_interclr_loss_is_weighted_sum():
    assert interclr_loss(torch.tensor(2.0), torch.tensor(4.0), weight=0.75).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="weight"):
        interclr_loss(torch.tensor(1.0), torch.tensor(1.0), weight=1.5)


def test_nt_xent_hand_value():
    # two orthogonal samples, identical views, τ = 1: each anchor sees e^1 vs two e^0 negatives
    z = t([1, 0], [0, 1])
    assert nt_xent(z, z.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e))


def test_cmc_two_view_hand_value():
    # every anchor sees its positive at cosine 0.6 and one negative at 0.8, τ = 0.5, both directions
    v1, v2 = t([1, 0], [0, 1]), t([0.6, 0.8], [0.8, 0.6])
    assert cmc_loss([v1, v2], temperature=0.5).item() == pytest.approx(2 * math.log(1 + math.exp(0.4)))


def test_cmc_bank_negatives_of_the_other_view_hand_value():
    # anchor view 1 uses view 2's bank negative (-1, 0); anchor view 2 uses view 1's (0, 1); τ = 1
    v1, v2 = t([1, 0]), t([0.6, 0.8])
    negatives = [t([[0, 1]]), t([[-1, 0]])]  # [B=1, K=1, D=2] per view
    loss = cmc_loss([v1, v2], temperature=1.0, negatives=negatives)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.6)) + math.log(1 + math.exp(0.2)))


def test_cacr_hand_value():
    # positives at squared distance 2 and 4 (t⁺ = 1), negatives at 0.8 and 4 (t⁻ = 2)
    q, pos, neg = t([1, 0]), t([[0, 1], [-1, 0]]), t([0.6, 0.8], [-1, 0])
    ca = (2 * math.exp(2) + 4 * math.exp(4)) / (math.exp(2) + math.exp(4))
    cr = -(0.8 * math.exp(-1.6) + 4 * math.exp(-8)) / (math.exp(-1.6) + math.exp(-8))
    assert cacr_loss(q, pos, neg, t_pos=1.0, t_neg=2.0).item() == pytest.approx(ca + cr)


def test_cacr_intra_batch_hand_value_the_other_query_joins_the_queue_softmax():
    # queries e0, e1, each its own positive (CA = 0); queue {(-1, 0)}; t⁻ = 1.
    # query e0: queue cost 4, other query cost 2; query e1: queue cost 2, other query cost 2
    q, queue = t([1, 0], [0, 1]), t([-1, 0])
    cr0 = -(4 * math.exp(-4) + 2 * math.exp(-2)) / (math.exp(-4) + math.exp(-2))
    loss = cacr_loss(q, q.unsqueeze(1), queue, t_neg=1.0, intra_batch=True)
    assert loss.item() == pytest.approx((cr0 - 2) / 2)
    assert cacr_loss(q, q.unsqueeze(1), queue, t_neg=1.0).item() == pytest.approx((-4 - 2) / 2)


@pytest.mark.parametrize("samples", [3, 5])
def test_cacr_multiview_hand_value_each_query_sees_the_m_minus_1_other_samples_of_the_later_view(samples):
    # view a = e0 for every sample, view b = (e0, e1, ..., e_{M-1}); t⁺ = t⁻ = 1.
    # Attraction, both ways: costs 0, 2, ..., 2. Repulsion (query a_i, negatives b_j, j ≠ i, one
    # softmax over M-1): a_0 sees M-1 negatives at cost 2; a_i, i ≥ 1, sees b_0 at cost 0 and M-2
    # at cost 2. Neither b_i nor view a's duplicates of a_i (cost 0) are negatives.
    a = torch.zeros(samples, samples, dtype=torch.float64)
    a[:, 0] = 1.0
    b = torch.eye(samples, dtype=torch.float64)
    attraction = 2 * (samples - 1) / samples
    others = samples - 2
    repulsion = (-2 - (samples - 1) * 2 * others * math.exp(-2) / (1 + others * math.exp(-2))) / samples
    loss = cacr_multiview_loss([a, b], t_pos=1.0, t_neg=1.0)
    assert loss.item() == pytest.approx(attraction + repulsion)


def test_align_uniform_hand_value():
    # aligned pairs, one pair of points at squared distance 2: U = log exp(-2·2) = -4
    x = t([1, 0], [0, 1])
    assert align_uniform_loss(x, x.clone()).item() == pytest.approx(-4.0)
    # swapped partners: alignment mean ‖x-y‖² = 2
    assert align_uniform_loss(x, t([0, 1], [1, 0])).item() == pytest.approx(2.0 - 4.0)


def test_hard_negative_hand_value_importance_weights_matter():
    # τ = 1, τ⁺ = 0, β = 1: Ng = N'·Σ w_j e^{s_j} = 2·Σ e^{2s} / Σ e^{s}; positives at cosine 0.6
    z1, z2 = t([1, 0], [0, 1]), t([0.6, 0.8], [0.8, 0.6])

    def anchor(a, b):
        ng = 2 * (math.exp(2 * a) + math.exp(2 * b)) / (math.exp(a) + math.exp(b))
        return math.log(1 + ng / math.exp(0.6))

    expected = (anchor(0.0, 0.8) + anchor(0.8, 0.96)) / 2  # the z1 anchors and the z2 anchors
    assert hard_negative_loss(z1, z2, temperature=1.0, tau_plus=0.0, beta=1.0).item() == pytest.approx(expected)


def test_hard_negative_debiasing_hand_value():
    # z1 = z2 orthogonal, τ = 1, τ⁺ = 0.1, β = 0: Ng = (2 - 0.1·2·e) / 0.9 (above the clamp 2/e)
    z = t([1, 0], [0, 1])
    ng = (2 - 0.2 * math.e) / 0.9
    loss = hard_negative_loss(z, z.clone(), temperature=1.0, tau_plus=0.1, beta=0.0)
    assert loss.item() == pytest.approx(math.log(1 + ng / math.e))


def test_hard_negative_clamp_at_n_e_to_minus_one_over_t():
    # τ⁺ large makes the debiased estimate negative: it is clamped at N'·e^(-1/τ)
    z = t([1, 0], [0, 1])
    loss = hard_negative_loss(z, z.clone(), temperature=1.0, tau_plus=0.9, beta=0.0)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-1) / math.e))


def test_byol_hand_value():
    assert byol_loss(t([1, 0]), t([0.6, 0.8])).item() == pytest.approx(0.8)
    assert byol_loss(t([1, 0]), t([2, 0])).item() == pytest.approx(0.0)


def test_soft_target_cross_entropy_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # softmax (0.25, 0.75)
    targets = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(expected)


def test_patch_nce_hand_value_and_negatives_only_from_same_image():
    # one image, two orthogonal patches, τ = 1: each patch sees e^1 vs one e^0 negative
    patches = t([1, 0], [0, 1]).unsqueeze(0)
    assert patch_nce(patches, patches.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + 1 / math.e))
    # a second image whose patches equal the first one's changes nothing: no cross-image negatives
    two = torch.cat([patches, patches])
    assert patch_nce(two, two.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + 1 / math.e))


# --- identities ---------------------------------------------------------------------------------

def test_margin_zero_equals_info_nce_and_logits_form_equals_embedding_form():
    g = torch.Generator().manual_seed(0)
    q, p, n = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, 16, 8, generator=g)
    a = info_nce(q, p, n, temperature=0.2)
    assert info_nce(q, p, n, temperature=0.2, margin=0.0).item() == pytest.approx(a.item())
    qn, pn, nn = (torch.nn.functional.normalize(x, dim=-1) for x in (q, p, n))
    pos = (qn * pn).sum(1)
    neg = torch.einsum("bd,bkd->bk", qn, nn)
    assert info_nce_from_logits(pos, neg, 0.2, margin=-0.5).item() == pytest.approx(
        info_nce(q, p, n, temperature=0.2, margin=-0.5).item())


def test_shared_negatives_equal_the_same_negatives_broadcast():
    g = torch.Generator().manual_seed(1)
    q, p, queue = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(32, 8, generator=g)
    shared = info_nce(q, p, queue, temperature=0.1, margin=-0.5)
    broadcast = info_nce(q, p, queue.expand(5, -1, -1), temperature=0.1, margin=-0.5)
    assert shared.item() == pytest.approx(broadcast.item())


def test_cmc_full_graph_and_core_view_with_two_views_equal_eq4():
    g = torch.Generator().manual_seed(2)
    v1, v2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    full = cmc_loss([v1, v2], temperature=0.1, paradigm="full")
    core = cmc_loss([v1, v2], temperature=0.1, paradigm="core")
    # Eq. 4 as two cross-entropies over the in-batch similarity matrix, anchored each way
    z1, z2 = (torch.nn.functional.normalize(v, dim=1) for v in (v1, v2))
    target = torch.arange(6)
    eq4 = (torch.nn.functional.cross_entropy(z1 @ z2.T / 0.1, target)
           + torch.nn.functional.cross_entropy(z2 @ z1.T / 0.1, target))
    assert full.item() == pytest.approx(core.item()) and core.item() == pytest.approx(eq4.item())


def test_cmc_core_view_and_full_graph_count_their_pairs():
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(4, 8, generator=g) for _ in range(3)]

    def pair(i, j):
        return cmc_loss([views[i], views[j]], temperature=0.1).item()

    assert cmc_loss(views, 0.1, "core").item() == pytest.approx(pair(0, 1) + pair(0, 2))  # Eq. 7
    assert cmc_loss(views, 0.1, "full").item() == pytest.approx(pair(0, 1) + pair(0, 2) + pair(1, 2))  # Eq. 8


def test_hard_negative_with_beta_zero_and_tau_plus_zero_equals_nt_xent():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    assert hard_negative_loss(z1, z2, temperature=0.5, tau_plus=0.0, beta=0.0).item() == pytest.approx(
        nt_xent(z1, z2, temperature=0.5).item())


def test_nt_xent_global_mean_over_shards_is_the_whole_batch_loss_and_gradient():
    # each shard's anchors against the whole batch; the whole batch reached through the same
    # tensors, so autograd sums the shards' gradients as the distributed gather's backward does
    g = torch.Generator().manual_seed(12)
    z1 = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    whole = nt_xent(z1, z2, temperature=0.5)
    shards = [nt_xent_global(z1[i:i + 2], z2[i:i + 2], z1, z2, offset=i, temperature=0.5) for i in (0, 2, 4)]
    mean = torch.stack(shards).mean()
    assert mean.item() == pytest.approx(whole.item())
    assert abs(shards[0].item() - whole.item()) > 1e-3  # one shard alone is not the whole batch
    grads = torch.autograd.grad(mean, (z1, z2))
    expected = torch.autograd.grad(whole, (z1, z2))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, expected))


def test_cacr_with_one_positive_has_attraction_weight_one():
    g = torch.Generator().manual_seed(5)
    q, p, neg = torch.randn(3, 4, generator=g), torch.randn(3, 1, 4, generator=g), torch.randn(7, 4, generator=g)
    qn, pn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(p[:, 0], dim=1)
    # the same loss with the query itself as positive (cost 0) leaves only the repulsion term
    repulsion_only = cacr_loss(q, qn.unsqueeze(1), neg, t_pos=5.0)
    attraction = cacr_loss(q, p, neg, t_pos=5.0) - repulsion_only
    assert attraction.item() == pytest.approx((qn - pn).pow(2).sum(1).mean().item())


def test_cacr_detached_weights_same_value_different_gradient():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(3, 4, generator=g, requires_grad=True)
    pos, neg = torch.randn(3, 3, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    a = cacr_loss(q, pos, neg)
    b = cacr_loss(q, pos, neg, detach_weights=True)
    assert a.item() == pytest.approx(b.item())
    (grad_a,) = torch.autograd.grad(a, q)
    (grad_b,) = torch.autograd.grad(b, q)
    assert not torch.allclose(grad_a, grad_b)


def reference_cacr_multiview(views: list[torch.Tensor], t_pos: float, t_neg: float) -> float:
    """Eq. 5 and the official `our_loss1` / `our_loss2` as plain loops over views, pairs and samples."""
    rows = [[torch.nn.functional.normalize(row, dim=0).tolist() for row in v] for v in views]
    samples, num_views = len(rows[0]), len(rows)

    def cost(u, v):
        return sum((x - y) ** 2 for x, y in zip(u, v))

    def expected_cost(costs, t):  # Σ_k softmax_k(t·c_k)·c_k
        weights = [math.exp(t * c) for c in costs]
        return sum(w * c for w, c in zip(weights, costs)) / sum(weights)

    attraction = sum(expected_cost([cost(rows[v][i], rows[w][i]) for w in range(num_views) if w != v], t_pos)
                     for v in range(num_views) for i in range(samples)) / (num_views * samples)
    pairs = [(x, y) for x in range(num_views) for y in range(x + 1, num_views)]
    repulsion = -sum(expected_cost([cost(rows[x][i], rows[y][j]) for j in range(samples) if j != i], -t_neg)
                     for x, y in pairs for i in range(samples)) / (len(pairs) * samples)
    return attraction + repulsion


def test_cacr_multiview_matches_a_loop_over_views_pairs_and_samples():
    g = torch.Generator().manual_seed(7)
    views = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3)]  # M = 3, K = 2, D = 4
    assert cacr_multiview_loss(views, 1.0, 2.0).item() == pytest.approx(reference_cacr_multiview(views, 1.0, 2.0))
    two = views[:2]
    assert cacr_multiview_loss(two, 0.5, 3.0).item() == pytest.approx(reference_cacr_multiview(two, 0.5, 3.0))


def reference_cacr_queue(q, positives, queue, t_pos, t_neg, detach_queue_weights):
    """App. C.2 / official `MoCo.forward`, one query at a time: positive weights without gradient;
    negatives = the queue and the other queries of the batch, one softmax."""
    qn, pn, kn = (torch.nn.functional.normalize(x, dim=-1) for x in (q, positives, queue))
    total = 0.0
    for i in range(q.shape[0]):
        pos_costs = torch.stack([(qn[i] - p).pow(2).sum() for p in pn[i]])
        attraction = (torch.softmax(t_pos * pos_costs, 0).detach() * pos_costs).sum()
        queue_costs = [(qn[i] - k).pow(2).sum() for k in kn]
        batch_costs = [(qn[i] - qn[j]).pow(2).sum() for j in range(q.shape[0]) if j != i]
        costs = torch.stack(queue_costs + batch_costs)
        for_weights = torch.stack([c.detach() if detach_queue_weights else c for c in queue_costs] + batch_costs)
        repulsion = -(torch.softmax(-t_neg * for_weights, 0) * costs).sum()
        total = total + attraction + repulsion
    return total / q.shape[0]


@pytest.mark.parametrize("detach_queue_weights", [True, False])
def test_cacr_queue_form_with_intra_batch_matches_a_loop_implementation(detach_queue_weights):
    g = torch.Generator().manual_seed(8)
    q = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)  # B = 3, D = 4
    positives = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)  # K = 2 keys
    queue = torch.randn(5, 4, generator=g, dtype=torch.float64)
    loss = cacr_loss(q, positives, queue, 1.0, 2.0, detach_weights=True, intra_batch=True,
                     detach_negative_weights=detach_queue_weights)
    expected = reference_cacr_queue(q, positives, queue, 1.0, 2.0, detach_queue_weights)
    assert loss.item() == pytest.approx(expected.item())
    (grad,) = torch.autograd.grad(loss, q)
    (expected_grad,) = torch.autograd.grad(expected, q)
    assert torch.allclose(grad, expected_grad, atol=1e-12)


def test_cacr_intra_batch_is_the_other_queries_appended_to_the_negatives():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    positives = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    queue = torch.randn(5, 4, generator=g, dtype=torch.float64)
    others = torch.stack([torch.stack([q[j] for j in range(3) if j != i]) for i in range(3)])  # [B, B-1, D]
    explicit = cacr_loss(q, positives, torch.cat([queue.expand(3, -1, -1), others], dim=1))  # [B, 5 + 2, D]
    with_intra = cacr_loss(q, positives, queue, intra_batch=True)
    assert with_intra.item() == pytest.approx(explicit.item())
    assert torch.allclose(torch.autograd.grad(with_intra, q)[0], torch.autograd.grad(explicit, q)[0], atol=1e-12)
    assert cacr_loss(q, positives, queue).item() != pytest.approx(with_intra.item())


def test_cacr_detached_negative_weights_same_value_different_gradient():
    g = torch.Generator().manual_seed(10)
    q = torch.randn(3, 4, generator=g, requires_grad=True)
    positives, queue = torch.randn(3, 2, 4, generator=g), torch.randn(5, 4, generator=g)
    a = cacr_loss(q, positives, queue, intra_batch=True)
    b = cacr_loss(q, positives, queue, intra_batch=True, detach_negative_weights=True)
    assert a.item() == pytest.approx(b.item())
    assert not torch.allclose(torch.autograd.grad(a, q)[0], torch.autograd.grad(b, q)[0])


# --- limits ---------------------------------------------------------------------------------------

def test_info_nce_is_log_k_plus_one_when_all_similarities_are_equal():
    q, p = t([1, 0]), t([0, 1])
    negatives = t(*[[0, 1]] * 7).unsqueeze(0)  # K = 7, every cosine 0
    assert info_nce(q, p, negatives, temperature=0.07).item() == pytest.approx(math.log(8))


def test_nt_xent_identical_views_of_orthogonal_samples_is_minimal_among_orthogonal_negatives():
    # z1 = z2, orthogonal samples: every anchor has cosine 1 to its positive and 0 to its 2N-2
    # negatives, so the loss is log(1 + (2N-2)·e^(-1/τ)).
    n, tau = 4, 0.5
    best = nt_xent(torch.eye(n), torch.eye(n), temperature=tau).item()
    assert best == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / tau)))
    # Rotating each second view into its own extra axis keeps every negative orthogonal and lowers
    # the positive cosine to cos θ: the loss grows monotonically with θ.
    previous = best
    for theta in (0.1, 0.3, 0.6, 1.0):
        z2 = torch.cat([math.cos(theta) * torch.eye(n), math.sin(theta) * torch.eye(n)], dim=1)
        z1 = torch.cat([torch.eye(n), torch.zeros(n, n)], dim=1)
        loss = nt_xent(z1, z2, temperature=tau).item()
        assert loss > previous
        previous = loss


def test_nt_xent_global_minimum_is_the_simplex_not_orthogonal():
    # The unconstrained optimum spreads the N samples as a regular simplex (cosine -1/(N-1)),
    # which beats orthogonal samples: "orthogonal is minimal" holds only with negatives held at 0.
    n, tau = 4, 0.5
    centred = torch.eye(n) - 1.0 / n
    simplex = torch.nn.functional.normalize(centred, dim=1)  # pairwise cosine -1/(n-1)
    assert (simplex[0] @ simplex[1]).item() == pytest.approx(-1 / (n - 1))
    assert nt_xent(simplex, simplex, tau).item() < nt_xent(torch.eye(n), torch.eye(n), tau).item()


def all_losses(x: list[torch.Tensor], temperature: float = 0.1):
    """Each loss as a function of three [B, D] tensors (plus derived shapes)."""
    a, b, c = x
    batch = a.shape[0]
    return {
        "info_nce": lambda: info_nce(a, b, c.unsqueeze(0).expand(batch, -1, -1), temperature, margin=-0.5),
        "info_nce_shared": lambda: info_nce(a, b, c, temperature),
        "nt_xent": lambda: nt_xent(a, b, temperature),
        "cmc_core": lambda: cmc_loss([a, b, c], temperature, "core"),
        "cmc_full_bank": lambda: cmc_loss([a, b], temperature, "full",
                                          negatives=[c.unsqueeze(0).expand(batch, -1, -1), c]),
        "cacr": lambda: cacr_loss(a, torch.stack([b, c], dim=1), c),
        "cacr_intra_batch": lambda: cacr_loss(a, torch.stack([b, c], dim=1), c, intra_batch=True),
        "cacr_multiview": lambda: cacr_multiview_loss([a, b, c]),
        "align_uniform": lambda: align_uniform_loss(a, b),
        "hard_negative": lambda: hard_negative_loss(a, b, temperature),
        "byol": lambda: byol_loss(a, b),
        "soft_target_ce": lambda: soft_target_cross_entropy(a, torch.softmax(c, dim=1)),
        "patch_nce": lambda: patch_nce(a.unsqueeze(0), b.unsqueeze(0), temperature),
    }


LOSS_NAMES = list(all_losses([torch.zeros(2, 2)] * 3))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_finite_for_zero_vectors(name):
    g = torch.Generator().manual_seed(9)
    x = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    for tensor in x:
        tensor[0] = 0.0  # a zero embedding in every input
        tensor.requires_grad_(True)
    loss = all_losses(x)[name]()
    grads = torch.autograd.grad(loss, x, allow_unused=True)
    assert torch.isfinite(loss)
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradcheck_float64(name):
    g = torch.Generator().manual_seed(10)
    x = [torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def fn(a, b, c):
        return all_losses([a, b, c], temperature=0.5)[name]()

    assert torch.autograd.gradcheck(fn, tuple(x), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_stable_at_temperature_0_01_with_similarities_near_one(name):
    g = torch.Generator().manual_seed(11)
    base = torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=1)
    x = []
    for sign in (1.0, 1.0, -1.0):  # a, b nearly equal (cos ≈ +1), c nearly opposite (cos ≈ -1)
        jitter = 1e-3 * torch.randn(6, 16, generator=g)
        x.append((sign * base + jitter).requires_grad_(True))
    loss = all_losses(x, temperature=0.01)[name]()
    grads = torch.autograd.grad(loss, x, allow_unused=True)
    assert torch.isfinite(loss), loss
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("call, message", [
    (lambda: info_nce(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(5, 3)), "same shape"),
    (lambda: info_nce(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 5, 3)), "per-sample negatives"),
    (lambda: info_nce(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(5, 3), temperature=0), "temperature"),
    (lambda: nt_xent_global(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(4, 3), 3),
     "rows of the global"),
    (lambda: cmc_loss([torch.zeros(2, 3)]), "at least 2 views"),
    (lambda: cacr_multiview_loss([torch.zeros(1, 3)] * 2), "at least 2 samples"),
    (lambda: cmc_loss([torch.zeros(2, 3)] * 2, paradigm="ring"), "paradigm"),
    (lambda: hard_negative_loss(torch.zeros(2, 3), torch.zeros(2, 3), tau_plus=1.0), "tau_plus"),
])
def test_bad_arguments_raise_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
