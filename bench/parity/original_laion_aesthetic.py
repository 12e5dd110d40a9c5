"""Score images with the authors' LAION aesthetic predictor (github christophschuhmann/improved-aesthetic-predictor);
run in the parity venv only, with the user's checkout of that repository as ``job["source"]``.

``original_laion_aesthetic.py make job.json``: writes ``job["clip_checkpoint"]`` as OpenAI's ``ViT-L-14.pt`` is
written: a TorchScript archive (``torch.jit.trace``) of OpenAI's own ``clip.model.CLIP`` at ViT-L/14's size
(``openai-clip``'s code, seed ``seed``), its weights rounded to float16 as the release stores them
(``clip.model.convert_weights``); ``clip.load(jit=False)`` takes that archive's ``state_dict()``. The same
weights go to ``job["clip_state_dict"]`` as a plain state dict, for synpref's ``checkpoint`` parameter.

``original_laion_aesthetic.py score job.json``: runs the repository's ``simple_inference.py`` unchanged (its whole
file, ``runpy.run_path``), once per distinct image, in a scratch folder holding ``test.jpg`` (a link to the image)
and ``sac+logos+ava1-l14-linearMSE.pth`` (a link to the repository's own head, the release), and reads its
``prediction``. Substitutions, none in the scoring: ``clip.load`` gets the file above instead of downloading
ViT-L-14.pt; the script's hard-coded ``"cuda"`` (``model.to("cuda")``, ``torch.cuda.FloatTensor``, and the head's CUDA storages,
which ``torch.load`` maps to the CPU) becomes the CPU (this machine has no GPU; on CPU ``clip.load`` casts CLIP to float32, so both sides run float32).
"""
import json
import os
import runpy
import sys
import tempfile

import torch

mode, path = sys.argv[1:3]
job = json.loads(open(path).read())
import clip  # noqa: E402  (openai-clip)

if mode == "make":
    torch.manual_seed(job["seed"])
    model = clip.model.CLIP(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                            vision_patch_size=14, context_length=77, vocab_size=49408, transformer_width=768,
                            transformer_heads=12, transformer_layers=12)
    clip.model.convert_weights(model)  # the release's float16 values, traced in float32 on this CPU
    model.float().eval()
    traced = torch.jit.trace(model, (torch.randn(1, 3, 224, 224), clip.tokenize(["a photograph"])))
    traced.save(job["clip_checkpoint"])
    torch.save(model.state_dict(), job["clip_state_dict"])
    print(json.dumps({"keys": len(model.state_dict())}))
    sys.exit(0)
assert mode == "score", mode

clip.clip._download = lambda url, root=None: job["clip_checkpoint"]  # instead of fetching ViT-L-14.pt
torch.cuda.FloatTensor = torch.FloatTensor
_to = torch.nn.Module.to


def _to_cpu(self, *args, **kwargs):
    return _to(self, *["cpu" if a == "cuda" else a for a in args], **kwargs)


torch.nn.Module.to = _to_cpu
_load = torch.load


def _load_on_cpu(f, *args, **kwargs):  # the released head was saved from CUDA tensors
    return _load(f, *args, **{"map_location": "cpu", **kwargs})


torch.load = _load_on_cpu
script = os.path.join(job["source"], "simple_inference.py")
head = os.path.join(job["source"], "sac+logos+ava1-l14-linearMSE.pth")
by_image = {}
for image, _ in job["items"]:
    if image not in by_image:
        with tempfile.TemporaryDirectory() as scratch:
            os.symlink(os.path.abspath(image), os.path.join(scratch, "test.jpg"))
            os.symlink(os.path.abspath(head), os.path.join(scratch, "sac+logos+ava1-l14-linearMSE.pth"))
            cwd = os.getcwd()
            os.chdir(scratch)
            try:
                by_image[image] = float(runpy.run_path(script)["prediction"].reshape(-1)[0])
            finally:
                os.chdir(cwd)
print(json.dumps({"scores": [by_image[image] for image, _ in job["items"]]}))
