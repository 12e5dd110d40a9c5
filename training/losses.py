"""Preference losses on per-image denoising errors: Diffusion-DPO and RankDPO.

All inputs are per-image errors already reduced to the mean over C, H, W (as the
Diffusion-DPO code does; Wallace et al. 2023, arXiv 2311.12908; docs/math.md s.5), so beta is on Diffusion-DPO's scale.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DISCOUNT_RANKS = ("label", "model")
DPO_PAIRS = ("best_worst", "all")


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Diffusion-DPO loss per pair (Wallace et al. 2023, arXiv 2311.12908; docs/math.md s.5).

    ``-log sigmoid(-0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l)))``: the loss falls
    when the model denoises the winner better than the frozen reference does, relative to the loser.

    Args:
        model_err_w, model_err_l: trained model's mean squared errors on winner / loser, shape [P].
        ref_err_w, ref_err_l: the same for the reference model, shape [P].
        beta: KL strength (5000 in the official SD1.5/SDXL recipes).

    Returns:
        Per-pair loss, shape [P] (the caller reduces).
    """
    model_diff = model_err_w - model_err_l
    ref_diff = ref_err_w - ref_err_l
    return -F.logsigmoid(-0.5 * beta * (model_diff - ref_diff))


def model_rank(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of each image by score, lowest first; ties keep index order (stable sort).

    Computed without gradient: the discount only weights pairs (LiPO-lambda; docs/math.md s.4).
    """
    order = torch.sort(scores.detach(), stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(scores) + 1, device=scores.device)
    return rank


def rankdpo_loss(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    phi: torch.Tensor,
    label_rank: torch.Tensor | None,
    beta: float,
    discount_rank: Literal["label", "model"] = "label",
    pair_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """RankDPO loss for ONE prompt (arXiv 2410.18013 Eq. 5-7, Algorithm 2; docs/math.md s.4).

    s_i = model_err_i - ref_err_i, G_i = 2^phi_i - 1, D(tau) = ln(1 + tau),
    Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|, and the loss is the sum over pairs
    with phi_w > phi_l of ``-Delta_wl * log sigmoid(-beta * (s_w - s_l))``. Equal phi gives no pair.
    With k = 2 this is Diffusion-DPO with beta' = 2 beta, weighted by |G_w - G_l| |1/ln2 - 1/ln3|.

    Args:
        model_err: trained model's per-image mean squared error, shape [k].
        ref_err: reference model's per-image mean squared error, shape [k].
        phi: Syn-Pic win rates in [0, 1], shape [k].
        label_rank: 1-based ranks from the labels (1 = best), shape [k]; may be ``None``
            when ``discount_rank="model"``.
        beta: KL strength (2500 matches Diffusion-DPO's 0.5 * 5000).
        discount_rank: where tau comes from: ``"label"`` (Algorithm 2) or ``"model"`` (the
            model's current order by s, lowest first, as in Figure 2 and LiPO-lambda).
        pair_mask: optional [k, k] bool; a pair (w, l) with ``pair_mask[w, l]`` False leaves the sum
            (noisy-pair filtering, ``min_pair_agreement``). Ranks and gains still use all k images.

    Returns:
        Scalar: the per-prompt sum over pairs.
    """
    if discount_rank not in DISCOUNT_RANKS:
        raise ValueError(f"discount_rank must be one of {list(DISCOUNT_RANKS)}, got {discount_rank!r}")
    if model_err.dim() != 1 or model_err.shape != ref_err.shape or model_err.shape != phi.shape:
        raise ValueError(
            f"model_err, ref_err and phi must be 1-D of equal length k, got shapes "
            f"{tuple(model_err.shape)}, {tuple(ref_err.shape)}, {tuple(phi.shape)}"
        )
    s = model_err - ref_err  # [k]
    if discount_rank == "label":
        if label_rank is None or label_rank.shape != s.shape:
            raise ValueError("discount_rank='label' needs label_rank of the same shape as phi")
        tau = label_rank
    else:
        tau = model_rank(s)
    gain = torch.pow(2.0, phi.to(s.dtype)) - 1  # [k]
    inv_discount = 1.0 / torch.log1p(tau.to(s.dtype))  # [k]
    delta = (gain[:, None] - gain[None, :]).abs() * (inv_discount[:, None] - inv_discount[None, :]).abs()  # [k, k]
    wins = phi[:, None] > phi[None, :]  # [k, k]: row w beats column l
    if pair_mask is not None:
        wins = wins & pair_mask.to(wins.device)
    pair_loss = -delta * F.logsigmoid(-beta * (s[:, None] - s[None, :]))  # [k, k]
    return torch.where(wins, pair_loss, torch.zeros_like(pair_loss)).sum()


def rankdpo_loss_batched(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    phi: torch.Tensor,
    label_rank: torch.Tensor | None,
    group: torch.Tensor,
    beta: float,
    discount_rank: Literal["label", "model"] = "label",
    pair_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over prompts of ``rankdpo_loss`` for a flat batch with variable k per prompt.

    The same terms as calling ``rankdpo_loss`` per prompt, computed on the whole [N, N] pair grid at once
    (pairs across prompts masked out), so the cost does not grow with a Python loop over prompts.

    Args:
        model_err, ref_err, phi, label_rank: per-image values of all prompts, shape [N].
        group: prompt index 0..B-1 of each image, shape [N].
        beta, discount_rank: as in ``rankdpo_loss``.
        pair_mask: optional [N, N] bool (block-diagonal, ``RankedBatch.pair_mask``); see ``rankdpo_loss``.

    Returns:
        Scalar: per-prompt sums averaged over the B prompts (docs/math.md s.4, "Reduction").
    """
    if discount_rank not in DISCOUNT_RANKS:
        raise ValueError(f"discount_rank must be one of {list(DISCOUNT_RANKS)}, got {discount_rank!r}")
    if model_err.dim() != 1 or not model_err.shape == ref_err.shape == phi.shape == group.shape:
        raise ValueError(
            f"model_err, ref_err, phi and group must be 1-D of equal length N, got shapes {tuple(model_err.shape)}, "
            f"{tuple(ref_err.shape)}, {tuple(phi.shape)}, {tuple(group.shape)}"
        )
    s = model_err - ref_err  # [N]
    same_prompt = group[:, None] == group[None, :]  # [N, N]
    if discount_rank == "label":
        if label_rank is None or label_rank.shape != s.shape:
            raise ValueError("discount_rank='label' needs label_rank of the same shape as phi")
        tau = label_rank
    else:  # model_rank within each prompt: 1 + images of the prompt with lower s (ties: lower index first)
        d = s.detach()
        index = torch.arange(len(s), device=s.device)
        before = (d[None, :] < d[:, None]) | ((d[None, :] == d[:, None]) & (index[None, :] < index[:, None]))
        tau = 1 + (same_prompt & before).sum(dim=1)
    gain = torch.pow(2.0, phi.to(s.dtype)) - 1  # [N]
    inv_discount = 1.0 / torch.log1p(tau.to(s.dtype))  # [N]
    delta = (gain[:, None] - gain[None, :]).abs() * (inv_discount[:, None] - inv_discount[None, :]).abs()  # [N, N]
    wins = same_prompt & (phi[:, None] > phi[None, :])  # row w beats column l, same prompt
    if pair_mask is not None:
        wins = wins & pair_mask.to(wins.device)
    pair_loss = -delta * F.logsigmoid(-beta * (s[:, None] - s[None, :]))  # [N, N]
    per_image = torch.where(wins, pair_loss, torch.zeros_like(pair_loss)).sum(dim=1)  # [N]: pairs it wins
    prompts, slot = torch.unique(group, return_inverse=True)
    per_prompt = torch.zeros(len(prompts), dtype=s.dtype, device=s.device).index_add(0, slot, per_image)
    return per_prompt.mean()


def preference_pairs(
    phi: torch.Tensor,
    label_rank: torch.Tensor,
    group: torch.Tensor,
    mode: Literal["best_worst", "all"],
    pair_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Winner / loser image indices for plain Diffusion-DPO on ranked data.

    ``best_worst`` pairs rank 1 with rank k of each prompt; ``all`` takes every pair with
    phi_w > phi_l. Tied pairs are dropped, as the official Diffusion-DPO code drops ties.
    ``pair_mask`` ([N, N] bool) drops the pairs it marks False (a filtered best-worst pair
    is dropped, not replaced).

    Returns:
        (winner indices, loser indices), each shape [P], into the flat [N] batch.
    """
    if mode not in DPO_PAIRS:
        raise ValueError(f"dpo_pairs must be one of {list(DPO_PAIRS)}, got {mode!r}")
    same_prompt = group[:, None] == group[None, :]  # [N, N]
    wins = same_prompt & (phi[:, None] > phi[None, :])
    if mode == "best_worst":
        big = torch.iinfo(torch.long).max
        rank = label_rank.long()
        best = torch.where(same_prompt, rank[None, :], big).min(dim=1).values  # [N]: best rank in my prompt
        worst = torch.where(same_prompt, rank[None, :], 0).max(dim=1).values
        wins &= (rank == best)[:, None] & (rank == worst)[None, :]
    if pair_mask is not None:
        wins &= pair_mask.to(wins.device)
    w, l = wins.nonzero(as_tuple=True)
    return w, l


def pairwise_dpo_loss(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    phi: torch.Tensor,
    label_rank: torch.Tensor,
    group: torch.Tensor,
    beta: float,
    pairs: Literal["best_worst", "all"] = "best_worst",
    pair_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Diffusion-DPO averaged over the pairs that ``preference_pairs`` takes from a ranked batch.

    Averaging over pairs (not prompts) matches exporting the pairs to Pick-a-Pic format and
    training Diffusion-DPO on them. A batch without any untied pair gives a zero loss that
    still carries the graph, so the training step runs unchanged.
    """
    w, l = preference_pairs(phi, label_rank, group, pairs, pair_mask)
    if len(w) == 0:
        return model_err.sum() * 0.0
    return diffusion_dpo_loss(model_err[w], model_err[l], ref_err[w], ref_err[l], beta).mean()


def implicit_accuracy(model_err: torch.Tensor, ref_err: torch.Tensor, w: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Share of pairs (w, l) the model already prefers more than the reference does: s_w < s_l.

    This is diffusers' Diffusion-DPO ``implicit_acc`` (the DPO logit -(s_w - s_l) > 0; an exact
    tie, as at step 0 when the LoRA is still zero, counts as wrong). ``nan`` without pairs.
    """
    if len(w) == 0:
        return torch.tensor(float("nan"))
    s = (model_err - ref_err).detach()  # [N]
    return (s[l] - s[w] > 0).float().mean()
