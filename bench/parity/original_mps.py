"""Score images with the authors' MPS code (github Kwai-Kolors/MPS); run in the parity venv only, with the user's
checkout of that repository as ``job["source"]`` (put on ``sys.path``, as its scripts expect to run from it).

``original_mps.py make job.json``: writes ``job["checkpoint"]`` as the release is written: ``torch.save`` of a whole
float16 ``trainer.models.clip_model.CLIPModel`` (the authors' class; seed ``seed``). Its constructor calls
``XCLIPModel.from_pretrained(ckpt)`` on the LAION CLIP-H repo, a 3.9 GB download whose weights the release
replaces; here that call builds ``XCLIPModel(CLIPConfig.from_pretrained(processor))`` instead (random weights, the
same architecture). The fusion's ``to_kv`` / ``to_q`` etc. keep their own random initialisation.

``original_mps.py score job.json``: as the repository's ``eval_overall_mps_on_hpdv2.py`` ``main``: its
``CLIPImageProcessor`` and ``AutoTokenizer`` from the processor folder, ``torch.load`` of the whole module, then
its ``infer_one_sample(image_path, prompt, ...)`` once per (image, prompt), unchanged; the score is
``image_score[0]``. Substitutions, none in the scoring: the module is cast to float32 and run on the CPU (the
script hard-codes CUDA and a float16 module); ``infer_one_sample`` hands the vision tower ``pixel_values.half()``,
which a float32 tower on transformers 4.27 refuses, so a pre-hook on the patch embedding casts that input to the
weight dtype (what later transformers do themselves); the pixels are still rounded to float16 first.
"""
import json
import sys

import torch

mode, path = sys.argv[1:3]
job = json.loads(open(path).read())
sys.path.insert(0, job["source"])
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor  # noqa: E402

from trainer.models import clip_model  # noqa: E402

if mode == "make":
    clip_model.XCLIPModel.from_pretrained = classmethod(lambda cls, ckpt: cls(CLIPConfig.from_pretrained(ckpt)))
    torch.manual_seed(job["seed"])
    model = clip_model.CLIPModel(job["processor"]).half().eval()
    torch.save(model, job["checkpoint"])
    print(json.dumps({"keys": len(model.state_dict())}))
    sys.exit(0)
assert mode == "score", mode

import eval_overall_mps_on_hpdv2 as authors  # noqa: E402

device = "cpu"
image_processor = CLIPImageProcessor.from_pretrained(job["processor"])
tokenizer = AutoTokenizer.from_pretrained(job["processor"], trust_remote_code=True)
model = torch.load(job["checkpoint"], weights_only=False)
model.eval().to(device).float()
embed = model.model.vision_model.embeddings.patch_embedding
embed.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype),))
scores = []
with torch.no_grad():
    for image, prompt in job["items"]:
        score = authors.infer_one_sample(image, prompt, model, image_processor, tokenizer, device)
        scores.append(float(score.reshape(-1)[0]))
print(json.dumps({"scores": scores}))
