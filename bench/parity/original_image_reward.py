"""Score images with the authors' ImageReward package (``pip install image-reward``); run in the parity venv only.

``original_image_reward.py make job.json``: writes ``job["checkpoint"]``, the state dict of the authors'
``ImageReward`` module built from ``med_config`` with seed ``seed`` (so the file has the release's keys,
shapes and format by construction; ``torch.save`` of a plain state dict, as ``ImageReward.pt``). The MLP head,
which the authors initialise with std 1/769 and zero biases (scores would all be about -0.162), is redrawn
with std 1/sqrt(fan_in) and random biases so that scores vary from image to image.

``original_image_reward.py score job.json``: {"checkpoint", "med_config", "tokenizer", "items": [[path, prompt]]}
-> {"scores": [...]}: ``ImageReward.load(checkpoint, device="cpu", med_config=...)`` then
``model.score(prompt, [paths])`` once per prompt (its ``inference_rank`` path), unchanged.

Two substitutions, neither touching the scoring code: BLIP's ``init_tokenizer`` asks the hub for
``bert-base-uncased``; here ``BertTokenizer.from_pretrained("bert-base-uncased")`` reads the local folder
``tokenizer`` instead (the same file synpref reads). And the package's ``__init__`` imports ``ReFL``, its
training script (diffusers, datasets, accelerate); that module is replaced by an empty one.
"""
import json
import sys
import types

import torch

sys.modules["ImageReward.ReFL"] = types.ModuleType("ImageReward.ReFL")  # training code only
mode, path = sys.argv[1:3]
job = json.loads(open(path).read())

import ImageReward.models.BLIP.blip as blip  # noqa: E402
from transformers import BertTokenizer  # noqa: E402


class _LocalBertTokenizer(BertTokenizer):
    @classmethod
    def from_pretrained(cls, name, *args, **kwargs):
        return BertTokenizer.from_pretrained(job["tokenizer"] if name == "bert-base-uncased" else name, *args, **kwargs)


blip.BertTokenizer = _LocalBertTokenizer
import ImageReward as RM  # noqa: E402

if mode == "make":
    torch.manual_seed(job["seed"])
    model = RM.ImageReward(med_config=job["med_config"], device="cpu")
    with torch.no_grad():
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
                torch.nn.init.normal_(layer.bias, std=0.5)
    torch.save(model.state_dict(), job["checkpoint"])
    print(json.dumps({"keys": len(model.state_dict())}))
elif mode == "score":
    model = RM.load(job["checkpoint"], device="cpu", med_config=job["med_config"])
    by_prompt = {}
    for n, (image, prompt) in enumerate(job["items"]):
        by_prompt.setdefault(prompt, []).append(n)
    scores = [0.0] * len(job["items"])
    with torch.no_grad():
        for prompt, rows in by_prompt.items():
            out = model.score(prompt, [job["items"][n][0] for n in rows])
            out = out if isinstance(out, list) else [out]
            for n, s in zip(rows, out):
                scores[n] = float(s)
    print(json.dumps({"scores": scores}))
else:
    raise SystemExit(f"unknown mode {mode}")
