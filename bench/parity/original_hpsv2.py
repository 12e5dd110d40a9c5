"""Score images with the authors' HPSv2 package (``pip install hpsv2``); run in the parity venv only.

``original_hpsv2.py score job.json``: the job is {"checkpoint", "version", "items": [[image_path, prompt], ...]};
prints {"scores": [...]} (one per item, in order) as JSON. ``hpsv2.img_score.score`` is called unchanged, once
per prompt with the list of that prompt's image paths, as its README shows (it reloads the checkpoint on every
call, so one call per item would load 4 GB fourteen times). Two substitutions, neither in the scoring: its
``initialize_model`` asks open_clip for the LAION ``laion2B-s32B-b79K`` weights (a 3.9 GB download), which
``score`` then overwrites, every tensor, with the HPS checkpoint (``load_state_dict``, strict); here the model
is created without them, which changes no weight that scores an image. And ``torch.load`` of the checkpoint
is read from disk once and handed out again on later calls (``score`` still loads it into the model each time).
"""
import json
import sys

import hpsv2.img_score as img_score

_create = img_score.create_model_and_transforms


def _without_laion_download(model_name, pretrained=None, **kwargs):
    return _create(model_name, None, **kwargs)


img_score.create_model_and_transforms = _without_laion_download
_load, _loaded = img_score.torch.load, {}


def _load_once(path, *args, **kwargs):
    if path not in _loaded:
        _loaded[path] = _load(path, *args, **kwargs)
    return _loaded[path]


img_score.torch.load = _load_once
img_score.device = "cpu"

mode, path = sys.argv[1:3]
assert mode == "score", mode
job = json.loads(open(path).read())
by_prompt = {}
for n, (image, prompt) in enumerate(job["items"]):
    by_prompt.setdefault(prompt, []).append(n)
scores = [0.0] * len(job["items"])
for prompt, rows in by_prompt.items():
    out = img_score.score([job["items"][n][0] for n in rows], prompt, cp=job["checkpoint"], hps_version=job["version"])
    for n, s in zip(rows, out):
        scores[n] = float(s)
print(json.dumps({"scores": scores}))
