"""VLM judges: ask an image-text-to-text model (Qwen2-VL, Qwen2.5-VL, ...) about the candidates.

How it is built, its checkpoint format and how it was checked: docs/rewards.md, `vlm_judge`.
"""
from __future__ import annotations

import hashlib
import math
import re
import string
from typing import Any, Optional, Sequence, Union

from PIL import Image

from .base import Reward, register_reward
from ..model_io import local_copy, pick_device

DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
DEFAULT_QUESTION = 'Does this image show: "{prompt}"? Answer Yes or No.'
DEFAULT_LIKERT = ('How well does this image match the description "{prompt}"? Rate it on a scale from 1 to '
                  '{scale}, where 1 means not at all and {scale} means perfectly. Answer with a single number.')
DEFAULT_PAIRWISE = 'Which image better matches "{prompt}"? Answer A or B.'
YES_NO = ("Yes", "No")
A_B = ("A", "B")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# A chat turn's content: text parts and images, in order.
Part = Union[str, Image.Image]


def check_template(template: str, what: str, allowed: Sequence[str] = ("prompt",)) -> str:
    """A template must be a ``str.format`` string with a ``{prompt}`` field and no other unknown field."""
    if not isinstance(template, str):
        raise ValueError(f"{what} must be a string, got {type(template).__name__}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ValueError(f"{what} is not a valid format string ({err}): {template!r}") from None
    if "prompt" not in fields:
        raise ValueError(f"{what} must contain {{prompt}}: {template!r}")
    unknown = sorted(fields - set(allowed))
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown} (allowed: {list(allowed)}): {template!r}")
    return template


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def parse_likert(text: str, scale: int) -> float:
    """The first number in ``text`` if it is an integer in 1..scale, else NaN.

    Only the first number counts and nothing is clamped: "I'd say 7/10" on a 1-5 scale is NaN, not
    5 (the model answered on another scale; clamping would turn that into a top rating, and reading
    on to a later number would pick "10"). Numbers written as words ("five"), negatives, fractions
    ("4.5") and digits inside words ("Qwen2") are not read as ratings; "4.0" reads as 4.
    """
    match = _NUMBER.search(text)
    if match is None:
        return float("nan")
    value = float(match.group())
    if not value.is_integer() or not 1 <= value <= scale:
        return float("nan")
    return value


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` when the tokenizer encodes it (no special tokens) as exactly one token."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the answer {word!r} is not a single token for this tokenizer (encodes to {ids}); "
                         f"a VLM judge reads the probability of the answer's one token")
    return int(ids[0])


def _pixel_key(image: Image.Image) -> str:
    h = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class VLMChat:
    """One chat VLM: loading, batched two-way answer probabilities, greedy generation."""

    def __init__(self, model: str, processor: str, device: str, dtype: str, trust_remote_code: bool,
                 max_pixels: int, batch_size: int, cache_dir: str):
        self.model_path, self.processor_path = model, processor or model
        self.device, self.dtype, self.trust_remote_code = device, dtype, bool(trust_remote_code)
        self.max_pixels, self.batch_size, self.cache_dir = max_pixels, batch_size, cache_dir
        self.model = self.processor = None
        self._token_ids: dict[str, int] = {}

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of both ``from_pretrained`` calls (``trust_remote_code`` always explicit)."""
        return {"trust_remote_code": self.trust_remote_code}

    def load(self) -> None:
        import inspect

        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(local_copy(self.processor_path, self.cache_dir),
                                                  **self.load_kwargs())
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"  # the last position of every row is then its last real token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.max_pixels:
            self._set_max_pixels(processor.image_processor)
        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        model = AutoModelForImageTextToText.from_pretrained(local_copy(self.model_path, self.cache_dir),
                                                            dtype=dtype, **self.load_kwargs())
        self._device = pick_device(self.device)
        self.model, self.processor = model.to(self._device).eval(), processor
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _set_max_pixels(self, image_processor) -> None:
        size = image_processor.size
        items = dict(size)  # a dict, or transformers 5's SizeDict (iterates as its non-None items)
        if "longest_edge" not in items or not hasattr(image_processor, "merge_size"):
            raise ValueError(f"max_pixels needs a Qwen-style image processor (a pixel budget in size.longest_edge), "
                             f"not {type(image_processor).__name__}")
        items = {k: v for k, v in items.items() if v is not None}
        items["longest_edge"] = int(self.max_pixels)
        items["shortest_edge"] = min(int(items.get("shortest_edge") or self.max_pixels), int(self.max_pixels))
        image_processor.size = items if isinstance(size, dict) else type(size)(**items)
        for attr, key in (("max_pixels", "longest_edge"), ("min_pixels", "shortest_edge")):  # transformers 4.x
            if getattr(image_processor, attr, None) is not None:
                setattr(image_processor, attr, items[key])

    def token_id(self, word: str) -> int:
        if word not in self._token_ids:
            self._token_ids[word] = single_token_id(self.processor.tokenizer, word)
        return self._token_ids[word]

    def inputs(self, conversations: Sequence[Sequence[Part]]):
        """Render each conversation (one user turn) with the chat template; one padded batch."""
        texts, images = [], []
        for parts in conversations:
            content = []
            for part in parts:
                if isinstance(part, str):
                    content.append({"type": "text", "text": part})
                else:
                    content.append({"type": "image"})
                    images.append(part.convert("RGB"))
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                            add_generation_prompt=True, tokenize=False))
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        return batch.to(self._device)

    def choice_probs(self, conversations: Sequence[Sequence[Part]], choices: tuple[str, str]) -> list[float]:
        """P(choices[0]) from the next-token logits restricted to the two choices' tokens."""
        import torch

        ids = [self.token_id(c) for c in choices]
        out: list[float] = []
        for start in range(0, len(conversations), self.batch_size):
            batch = self.inputs(conversations[start:start + self.batch_size])
            extra = {"logits_to_keep": 1} if self._keep_last else {}
            with torch.no_grad():
                logits = self.model(**batch, **extra).logits[:, -1, :]
            pair = logits[:, ids].float()
            out.extend(float(p) for p in torch.softmax(pair, dim=-1)[:, 0].cpu())
        return out

    def generate(self, conversations: Sequence[Sequence[Part]], max_new_tokens: int) -> list[str]:
        """Greedy answers, decoded without special tokens."""
        import torch

        out: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            batch = self.inputs(conversations[start:start + self.batch_size])
            with torch.no_grad():
                tokens = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=self.processor.tokenizer.pad_token_id)
            new = tokens[:, batch["input_ids"].shape[1]:]
            out.extend(self.processor.batch_decode(new, skip_special_tokens=True))
        return out


class _VLMReward(Reward):
    """Shared params and loading of the VLM judges (not registered itself)."""

    def __init__(self, *, model: str = DEFAULT_MODEL, processor: str = "", device: str = "auto",
                 dtype: str = "auto", trust_remote_code: bool = False, max_pixels: int = 0,
                 batch_size: int = 8, cache_dir: str = ""):
        if not model:
            raise ValueError(f"{self.name}: 'model' is required")
        if dtype not in DTYPES:
            raise ValueError(f"{self.name}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if not isinstance(trust_remote_code, bool):
            raise ValueError(f"{self.name}: trust_remote_code must be true or false, got {trust_remote_code!r}")
        if int(max_pixels) < 0:
            raise ValueError(f"{self.name}: max_pixels must be >= 0 (0 = the processor's own budget)")
        if int(batch_size) < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1")
        self._chat = VLMChat(model, processor, device, dtype, trust_remote_code, int(max_pixels),
                             int(batch_size), cache_dir)

    def load(self) -> None:
        self._chat.load()

    def _loaded(self) -> VLMChat:
        if self._chat.model is None:
            self.load()
        return self._chat

    def files(self) -> dict[str, str]:
        return {"model": self._chat.model_path, "processor": self._chat.processor_path}

    def params(self) -> dict[str, Any]:
        c = self._chat
        return {"model": c.model_path, "processor": c.processor_path, "dtype": c.dtype,
                "trust_remote_code": c.trust_remote_code, "max_pixels": c.max_pixels}


@register_reward("vlm_judge")
class VLMJudge(_VLMReward):
    """Pointwise VLM judge: P("Yes") to a question about the prompt (``yes_prob``) or a parsed 1..scale
    rating (``likert``). See the module docstring."""

    version = "1"

    def __init__(self, mode: str = "yes_prob", question_template: str = DEFAULT_QUESTION,
                 likert_template: str = DEFAULT_LIKERT, scale: int = 5, max_new_tokens: int = 8, **common):
        super().__init__(**common)
        if mode not in ("yes_prob", "likert"):
            raise ValueError(f"vlm_judge mode must be 'yes_prob' or 'likert', got {mode!r}")
        if not isinstance(scale, int) or scale < 2:
            raise ValueError(f"vlm_judge scale must be an integer >= 2, got {scale!r}")
        if int(max_new_tokens) < 1:
            raise ValueError("vlm_judge max_new_tokens must be >= 1")
        self.mode, self.scale, self.max_new_tokens = mode, scale, int(max_new_tokens)
        self.question_template = check_template(question_template, "vlm_judge question_template")
        self.likert_template = check_template(likert_template, "vlm_judge likert_template", ("prompt", "scale"))

    def params(self) -> dict[str, Any]:
        p = {**super().params(), "mode": self.mode}
        if self.mode == "yes_prob":
            return {**p, "question_template": self.question_template}
        return {**p, "likert_template": self.likert_template, "scale": self.scale,
                "max_new_tokens": self.max_new_tokens}

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        chat = self._loaded()
        if self.mode == "yes_prob":
            convs = [[im, self.question_template.format(prompt=p)] for im, p in zip(images, prompts)]
            return chat.choice_probs(convs, YES_NO)
        convs = [[im, self.likert_template.format(prompt=p, scale=self.scale)] for im, p in zip(images, prompts)]
        return [parse_likert(text, self.scale) for text in chat.generate(convs, self.max_new_tokens)]


def pair_conversation(first: Image.Image, second: Image.Image, question: str) -> list[Part]:
    """How a pair is shown: ``Image A:`` first, ``Image B:`` second, then the question."""
    return ["Image A:", first, "\nImage B:", second, "\n" + question]


@register_reward("vlm_pairwise_judge")
class VLMPairwiseJudge(_VLMReward):
    """Pairwise VLM judge: each image's mean both-orders win probability against the other images of
    its prompt. See the module docstring."""

    version = "1"

    def __init__(self, pairwise_template: str = DEFAULT_PAIRWISE, **common):
        super().__init__(**common)
        self.pairwise_template = check_template(pairwise_template, "vlm_pairwise_judge pairwise_template")

    def params(self) -> dict[str, Any]:
        return {**super().params(), "pairwise_template": self.pairwise_template}

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        scores: list[Optional[float]] = [None] * len(images)
        for prompt, index in groups.items():
            for i, s in zip(index, self.group_scores([images[i] for i in index], prompt)):
                scores[i] = s
        return [float(s) for s in scores]

    def group_scores(self, images: Sequence[Image.Image], prompt: str) -> list[float]:
        """Mean win probability of each image over the others (all images are of ``prompt``)."""
        k = len(images)
        if k < 2:
            return [math.nan] * k
        images = [im.convert("RGB") for im in images]
        order = sorted(range(k), key=lambda i: _pixel_key(images[i]))  # batch composition independent of input order
        pairs = [(a, b) for a in order for b in order if a != b]
        question = self.pairwise_template.format(prompt=prompt)
        p_first = dict(zip(pairs, self._loaded().choice_probs(
            [pair_conversation(images[a], images[b], question) for a, b in pairs], A_B)))
        # P(a beats b) = (P_ab(A) + P_ba(B)) / 2 = (P_ab(A) + 1 - P_ba(A)) / 2
        return [sum((p_first[(a, b)] + 1.0 - p_first[(b, a)]) / 2.0 for b in order if b != a) / (k - 1)
                for a in range(k)]
