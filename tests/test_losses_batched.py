"""The batched RankDPO loss (one [N, N] pair grid) equals the mean of the per-prompt ``rankdpo_loss``,
value and gradient, for variable k, tied phi and tied errors, pair masks and both discount ranks."""
import random

import pytest
import torch

from synpref.training.losses import rankdpo_loss, rankdpo_loss_batched


@pytest.mark.parametrize("discount_rank", ["label", "model"])
def test_batched_equals_the_mean_of_per_prompt_losses(discount_rank):
    rng = random.Random(0)
    torch.manual_seed(0)
    for trial in range(60):
        ks = [rng.randint(2, 5) for _ in range(rng.randint(1, 5))]
        group = torch.cat([torch.full((k,), b) for b, k in enumerate(ks)])
        n = len(group)
        phi = torch.tensor([rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(n)], dtype=torch.float64)  # ties
        rank = torch.cat([torch.randperm(k) + 1 for k in ks])
        model_err = torch.rand(n, dtype=torch.float64).round(decimals=1).requires_grad_()  # tied s too
        ref_err = torch.rand(n, dtype=torch.float64).round(decimals=1)
        mask = None
        if trial % 2:
            mask = torch.rand(n, n) > 0.3
            mask = mask & mask.T & (group[:, None] == group[None, :]) & ~torch.eye(n, dtype=torch.bool)

        batched = rankdpo_loss_batched(model_err, ref_err, phi, rank, group, 7.0, discount_rank, mask)
        (grad_batched,) = torch.autograd.grad(batched, model_err)
        per_prompt = [
            rankdpo_loss(model_err[group == b], ref_err[group == b], phi[group == b], rank[group == b], 7.0,
                         discount_rank, None if mask is None else mask[group == b][:, group == b])
            for b in range(len(ks))
        ]
        expected = torch.stack(per_prompt).mean()
        (grad_expected,) = torch.autograd.grad(expected, model_err)
        assert batched.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-15)
        torch.testing.assert_close(grad_batched, grad_expected, rtol=1e-12, atol=1e-15)


def test_batched_checks_shapes_and_discount():
    x = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="discount_rank must be one of"):
        rankdpo_loss_batched(x, x, x, torch.tensor([1, 2]), torch.tensor([0, 0]), 1.0, "lambda")
    with pytest.raises(ValueError, match="1-D of equal length"):
        rankdpo_loss_batched(x, x[:1], x, torch.tensor([1, 2]), torch.tensor([0, 0]), 1.0)
    with pytest.raises(ValueError, match="needs label_rank"):
        rankdpo_loss_batched(x, x, x, None, torch.tensor([0, 0]), 1.0)
