"""Score images with the authors' HPSv2 package (``pip install hpsv2``); run in the parity venv only.

Reads a JSON job {"checkpoint", "version", "items": [[image_path, prompt], ...]} from argv[1] and prints
{"scores": [...]} as JSON. ``hpsv2.img_score.score`` is called unchanged, one (image, prompt) at a time,
as its README shows. One substitution: its ``initialize_model`` asks open_clip for the LAION
``laion2B-s32B-b79K`` weights (a 3.9 GB download), which ``score`` then overwrites, every tensor, with the
HPS checkpoint (``load_state_dict``, strict); here the model is created without them, which changes no
weight that scores an image.
"""
import json
import sys

import hpsv2.img_score as img_score
from PIL import Image

_create = img_score.create_model_and_transforms


def _without_laion_download(model_name, pretrained=None, **kwargs):
    return _create(model_name, None, **kwargs)


img_score.create_model_and_transforms = _without_laion_download
img_score.device = "cpu"

job = json.loads(open(sys.argv[1]).read())
scores = [float(img_score.score(Image.open(path).convert("RGB"), prompt, cp=job["checkpoint"],
                                hps_version=job["version"])[0]) for path, prompt in job["items"]]
print(json.dumps({"scores": scores}))
