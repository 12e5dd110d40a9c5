"""BRISQUE, a no-reference image-quality score (Mittal, Moorthy & Bovik, IEEE TIP 2012), as a reward.

How it is built, its checkpoint format and how it was checked: docs/rewards.md, `brisque`.
"""
from __future__ import annotations

import math
from importlib import resources
from typing import Sequence

import numpy as np
from PIL import Image

from .base import Reward, register_reward

MIN_SIDE = 16
_SHAPES = np.round(0.2 + 0.001 * np.arange(9801), 3)  # MATLAB's 0.2:0.001:10
_TABLES: dict[str, np.ndarray] = {}
_MODEL: dict[str, np.ndarray] = {}


def _gaussian_window() -> np.ndarray:
    x = np.arange(7) - 3.0
    g = np.exp(-x * x / (2 * (7 / 6) ** 2))
    return g / g.sum()  # fspecial('gaussian', 7, 7/6) is the outer product of this with itself


_WINDOW = _gaussian_window()


def _tables() -> tuple[np.ndarray, np.ndarray]:
    if not _TABLES:
        lg1 = np.array([math.lgamma(1 / a) for a in _SHAPES])
        lg2 = np.array([math.lgamma(2 / a) for a in _SHAPES])
        lg3 = np.array([math.lgamma(3 / a) for a in _SHAPES])
        _TABLES["ggd"] = np.exp(lg1 + lg3 - 2 * lg2)  # Gamma(1/a) Gamma(3/a) / Gamma(2/a)^2
        _TABLES["aggd"] = np.exp(2 * lg2 - lg1 - lg3)  # its inverse
    return _TABLES["ggd"], _TABLES["aggd"]


def _filter_rows(x: np.ndarray) -> np.ndarray:
    """Each row correlated with the window, zero padded: rows laid end to end with 3 zeros either side,
    so one ``np.convolve`` call (C, direct) filters all of them without mixing neighbours."""
    h, w = x.shape
    p = np.zeros((h, w + 6))
    p[:, 3:w + 3] = x
    return np.convolve(p.ravel(), _WINDOW, "same").reshape(h, w + 6)[:, 3:w + 3]


def _filter(x: np.ndarray) -> np.ndarray:
    """MATLAB ``filter2(window, x, 'same')`` for the separable, symmetric 7x7 window: zero padding."""
    return _filter_rows(_filter_rows(x).T).T


def mscn(grey: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a grey image in 0..255."""
    mu = _filter(grey)
    sigma = np.sqrt(np.abs(_filter(grey * grey) - mu * mu))
    return (grey - mu) / (sigma + 1.0)


def fit_ggd(x: np.ndarray) -> tuple[float, float]:
    """(shape, sigma) of a zero-mean generalised Gaussian, by moment matching (``estimateggdparam``)."""
    sigma_sq = float(np.mean(x * x))
    e_abs = float(np.mean(np.abs(x)))
    if e_abs == 0.0:
        return math.nan, math.nan
    ratio = sigma_sq / e_abs ** 2
    return float(_SHAPES[np.argmin(np.abs(ratio - _tables()[0]))]), math.sqrt(sigma_sq)


def fit_aggd(x: np.ndarray) -> tuple[float, float, float]:
    """(shape, left sigma, right sigma) of an asymmetric generalised Gaussian (``estimateaggdparam``)."""
    n_neg, n_pos = int(np.count_nonzero(x < 0)), int(np.count_nonzero(x > 0))
    if n_neg == 0 or n_pos == 0:
        return math.nan, math.nan, math.nan
    neg = np.minimum(x, 0.0)
    sq_neg, sq_all = float(np.vdot(neg, neg)), float(np.vdot(x, x))
    left = math.sqrt(sq_neg / n_neg)
    right = math.sqrt((sq_all - sq_neg) / n_pos)
    g = left / right
    abs_sum = float(x.sum()) - 2.0 * float(neg.sum())  # sum |x| = sum x - 2 sum min(x, 0)
    r_hat = (abs_sum / x.size) ** 2 / (sq_all / x.size)
    r_norm = r_hat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    return float(_SHAPES[np.argmin((_tables()[1] - r_norm) ** 2)]), left, right


def _scale_features(grey: np.ndarray) -> list[float]:
    s = mscn(grey)
    alpha, sigma = fit_ggd(s)
    feats = [alpha, sigma ** 2]
    for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):  # circshift(s, shift): MATLAB's order
        pair = s * np.roll(s, shift, axis=(0, 1))
        a, left, right = fit_aggd(pair)
        mean = (right - left) * math.exp(math.lgamma(2 / a) - 0.5 * (math.lgamma(1 / a) + math.lgamma(3 / a))) \
            if math.isfinite(a) else math.nan
        feats += [a, mean, left ** 2, right ** 2]
    return feats


def brisque_features(image: Image.Image) -> np.ndarray:
    """The 36 BRISQUE features of an image (18 at full size, 18 at half size); NaN where undefined."""
    grey_image = image.convert("RGB").convert("L")
    w, h = grey_image.size
    if min(w, h) < MIN_SIDE:
        return np.full(36, np.nan)
    grey = np.asarray(grey_image, dtype=np.float64)
    half = Image.fromarray(grey.astype(np.float32)).resize(((w + 1) // 2, (h + 1) // 2), Image.Resampling.BICUBIC)
    return np.array(_scale_features(grey) + _scale_features(np.asarray(half, dtype=np.float64)))


def _model() -> dict[str, np.ndarray]:
    if not _MODEL:
        with resources.files(__package__).joinpath("brisque_live.npz").open("rb") as f, np.load(f) as z:
            _MODEL.update({k: np.array(z[k]) for k in z.files})
    return _MODEL


def brisque_scores(features: np.ndarray) -> np.ndarray:
    """BRISQUE scores (lower = better) of an (n, 36) feature array, with the LIVE-trained SVR."""
    m = _model()
    lo, hi = m["feature_min"], m["feature_max"]
    x = -1.0 + 2.0 * (np.atleast_2d(features) - lo) / (hi - lo)  # libsvm svm-scale to [-1, 1]
    d2 = ((x[:, None, :] - m["support_vectors"][None]) ** 2).sum(-1)
    return np.exp(-m["gamma"] * d2) @ m["dual_coef"] - m["rho"]


def brisque(image: Image.Image) -> float:
    """The BRISQUE score of one image: about 0 for pristine photographs, higher = more distorted."""
    return float(brisque_scores(brisque_features(image))[0])


@register_reward("brisque")
class Brisque(Reward):
    """Minus BRISQUE: higher = better technical quality (less blur, noise, blocking). Ignores the prompt.

    No parameters: the model is the authors' LIVE-trained SVR, shipped with the package. It is part of
    the code, so ``files()`` lists nothing; changing ``brisque_live.npz`` or the features means a new
    ``version``.
    """

    version = "1"

    def load(self) -> None:
        _model()
        _tables()

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if not images:
            return []
        feats = np.stack([brisque_features(im) for im in images])
        return [float(-s) for s in brisque_scores(feats)]
