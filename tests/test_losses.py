"""Loss values against arithmetic written out by hand (docs/math.md s.4-5)."""
import math

import pytest
import torch

from synpref.training.losses import (
    diffusion_dpo_loss,
    model_rank,
    preference_pairs,
    rankdpo_loss,
    rankdpo_loss_batched,
    pairwise_dpo_loss,
)


def neg_log_sigmoid(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_diffusion_dpo_value():
    # pair 0: model_diff = 0.10 - 0.12 = -0.02, ref_diff = 0 -> -0.5 * 100 * (-0.02) = 1.0
    # pair 1: model_diff = 0.30 - 0.20 = 0.10, ref_diff = 0.25 - 0.20 = 0.05 -> -0.5 * 100 * 0.05 = -2.5
    loss = diffusion_dpo_loss(t(0.10, 0.30), t(0.12, 0.20), t(0.11, 0.25), t(0.11, 0.20), beta=100)
    assert loss.tolist() == pytest.approx([neg_log_sigmoid(1.0), neg_log_sigmoid(-2.5)], rel=1e-9)


# k = 3, phi = (1, 0.5, 0), label ranks (1, 2, 3): G = (1, sqrt(2) - 1, 0), 1/D = (1/ln2, 1/ln3, 1/ln4).
PHI3 = t(1.0, 0.5, 0.0)
RANK3 = torch.tensor([1, 2, 3])
G = [1.0, math.sqrt(2) - 1.0, 0.0]
INV_D = {1: 1 / math.log(2), 2: 1 / math.log(3), 3: 1 / math.log(4)}


def test_rankdpo_k3_distinct_phi():
    # s = model_err - ref_err = (-0.02, 0.02, 0.0); beta = 50
    model_err, ref_err = t(0.10, 0.20, 0.30), t(0.12, 0.18, 0.30)
    expected = (
        abs(G[0] - G[1]) * abs(INV_D[1] - INV_D[2]) * neg_log_sigmoid(-50 * (-0.02 - 0.02))
        + abs(G[0] - G[2]) * abs(INV_D[1] - INV_D[3]) * neg_log_sigmoid(-50 * (-0.02 - 0.0))
        + abs(G[1] - G[2]) * abs(INV_D[2] - INV_D[3]) * neg_log_sigmoid(-50 * (0.02 - 0.0))
    )
    assert rankdpo_loss(model_err, ref_err, PHI3, RANK3, beta=50).item() == pytest.approx(expected, rel=1e-9)


def test_rankdpo_ties_contribute_zero():
    # phi = (0.5, 0.5): no pair at all, whatever the errors
    assert rankdpo_loss(t(0.1, 0.9), t(0.5, 0.2), t(0.5, 0.5), torch.tensor([1, 2]), beta=50).item() == 0.0
    # phi = (0.5, 0.5, 0): only the pairs (0, 2) and (1, 2); s = (0.01, -0.03, 0.0)
    g = 2**0.5 - 1
    expected = (
        g * abs(INV_D[1] - INV_D[3]) * neg_log_sigmoid(-50 * 0.01)
        + g * abs(INV_D[2] - INV_D[3]) * neg_log_sigmoid(-50 * -0.03)
    )
    loss = rankdpo_loss(t(0.11, 0.17, 0.3), t(0.10, 0.20, 0.3), t(0.5, 0.5, 0.0), RANK3, beta=50)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_discount_rank_model_vs_label():
    # s = (0.03, -0.01, 0.0): the model ranks image 1 first, then 2, then 0 -> tau_model = (3, 1, 2)
    model_err, ref_err = t(0.33, 0.29, 0.30), t(0.30, 0.30, 0.30)
    s = [0.03, -0.01, 0.0]
    pair_terms = {  # (w, l): |G_w - G_l| * neg_log_sigmoid(-beta (s_w - s_l)), beta = 50
        (w, l): abs(G[w] - G[l]) * neg_log_sigmoid(-50 * (s[w] - s[l])) for w, l in [(0, 1), (0, 2), (1, 2)]
    }
    tau_label, tau_model = (1, 2, 3), (3, 1, 2)
    expected = {
        name: sum(term * abs(INV_D[tau[w]] - INV_D[tau[l]]) for (w, l), term in pair_terms.items())
        for name, tau in (("label", tau_label), ("model", tau_model))
    }
    got = {name: rankdpo_loss(model_err, ref_err, PHI3, RANK3, beta=50, discount_rank=name).item() for name in expected}
    assert got["label"] == pytest.approx(expected["label"], rel=1e-9)
    assert got["model"] == pytest.approx(expected["model"], rel=1e-9)
    assert got["label"] != pytest.approx(got["model"], rel=1e-3)
    # model ranks need no label ranks
    no_labels = rankdpo_loss(model_err, ref_err, PHI3, None, beta=50, discount_rank="model")
    assert no_labels.item() == pytest.approx(expected["model"], rel=1e-9)


def test_model_rank_breaks_ties_by_index():
    assert model_rank(t(0.0, 0.0, -1.0)).tolist() == [2, 3, 1]


def test_k2_is_gain_weighted_diffusion_dpo_with_double_beta():
    model_err, ref_err = t(0.21, 0.18), t(0.2, 0.2)
    phi, beta = t(0.8, 0.3), 7.0
    weight = abs((2**0.8 - 1) - (2**0.3 - 1)) * abs(1 / math.log(2) - 1 / math.log(3))
    dpo = diffusion_dpo_loss(model_err[0], model_err[1], ref_err[0], ref_err[1], beta=2 * beta)
    rank = rankdpo_loss(model_err, ref_err, phi, torch.tensor([1, 2]), beta=beta)
    assert rank.item() == pytest.approx(weight * dpo.item(), rel=1e-9)


def test_rankdpo_gradient_favours_the_winner():
    model_err = t(0.2, 0.2, 0.2).requires_grad_()
    rankdpo_loss(model_err, t(0.2, 0.2, 0.2), PHI3, RANK3, beta=50).backward()
    # lowering the best image's error lowers the loss; lowering the worst's raises it
    assert model_err.grad[0] > 0 > model_err.grad[2]


def test_batched_is_mean_over_prompts():
    model_err, ref_err = t(0.10, 0.20, 0.30, 0.5, 0.4), t(0.12, 0.18, 0.30, 0.45, 0.45)
    phi, rank, group = t(1.0, 0.5, 0.0, 0.9, 0.2), torch.tensor([1, 2, 3, 1, 2]), torch.tensor([0, 0, 0, 1, 1])
    first = rankdpo_loss(model_err[:3], ref_err[:3], phi[:3], rank[:3], beta=50)
    second = rankdpo_loss(model_err[3:], ref_err[3:], phi[3:], rank[3:], beta=50)
    batched = rankdpo_loss_batched(model_err, ref_err, phi, rank, group, beta=50)
    assert batched.item() == pytest.approx((first.item() + second.item()) / 2, rel=1e-12)


def test_preference_pairs_and_ranked_dpo():
    phi, rank, group = t(1.0, 0.5, 0.0, 0.7, 0.7), torch.tensor([1, 2, 3, 1, 2]), torch.tensor([0, 0, 0, 1, 1])
    w, l = preference_pairs(phi, rank, group, "best_worst")
    assert list(zip(w.tolist(), l.tolist())) == [(0, 2)]  # prompt 1 is a tie: dropped
    w, l = preference_pairs(phi, rank, group, "all")
    assert sorted(zip(w.tolist(), l.tolist())) == [(0, 1), (0, 2), (1, 2)]
    # mean over pairs of Diffusion-DPO; errors chosen so each pair's argument is hand-known
    model_err, ref_err = t(0.1, 0.2, 0.3, 0.0, 0.0), t(0.1, 0.1, 0.1, 0.0, 0.0)
    # model_diff - ref_diff: (0,1): -0.1 - 0 = -0.1; (0,2): -0.2 - 0 = -0.2; (1,2): -0.1 - 0 = -0.1; beta = 10
    expected = (neg_log_sigmoid(0.5) + neg_log_sigmoid(1.0) + neg_log_sigmoid(0.5)) / 3
    assert pairwise_dpo_loss(model_err, ref_err, phi, rank, group, beta=10, pairs="all").item() == pytest.approx(expected)


def test_ranked_dpo_without_pairs_is_zero_with_graph():
    model_err = t(0.1, 0.2).requires_grad_()
    loss = pairwise_dpo_loss(model_err, t(0.1, 0.1), t(0.5, 0.5), torch.tensor([1, 2]), torch.tensor([0, 0]), beta=10)
    assert loss.item() == 0.0 and loss.requires_grad


def test_invalid_options_raise():
    with pytest.raises(ValueError, match=r"discount_rank must be one of \['label', 'model'\]"):
        rankdpo_loss(t(0.1, 0.2), t(0.1, 0.2), t(1.0, 0.0), torch.tensor([1, 2]), beta=1, discount_rank="lambda")
    with pytest.raises(ValueError, match="dpo_pairs must be one of"):
        preference_pairs(t(1.0, 0.0), torch.tensor([1, 2]), torch.tensor([0, 0]), "random")
    with pytest.raises(ValueError, match="1-D of equal length"):
        rankdpo_loss(t(0.1, 0.2), t(0.1), t(1.0, 0.0), torch.tensor([1, 2]), beta=1)
    with pytest.raises(ValueError, match="needs label_rank"):
        rankdpo_loss(t(0.1, 0.2), t(0.1, 0.2), t(1.0, 0.0), None, beta=1)
