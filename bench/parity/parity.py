"""Labels equal to the authors' code: score the same images with the original reward package and with synpref.

Not part of ``make test``: each authors' package is installed into its own virtual environment
(``$SYNPREF_PARITY_VENVS/<reward>``, default ``/work/wt/parity-venvs``, outside the repository). That
environment sees synpref's stack (torch, torchvision, open_clip...) through a ``.pth`` file, at lower
priority than its own packages, and gets from PyPI (``--no-deps``) only the authors' package and the pins
it needs that synpref's stack does not satisfy, so both sides run the same torch and differ in their code.

For each reward: random weights of the **full-size** architecture are written in the release's
checkpoint format (agreement does not depend on the weight values), real photographs (the ones
scikit-image bundles, plus crops to other sizes and aspect ratios) are paired with several prompts, and
both implementations score every (image, prompt) in float32 on CPU. Printed: the largest absolute and
relative difference, and the largest difference over the spread of the original's scores (random
weights can put scores near 0, where a relative difference says little). Exit 0 when within 1e-4.

    .venv/bin/python bench/parity/parity.py hpsv2 [--workdir /tmp/synpref-parity]
    .venv/bin/python bench/parity/parity.py image_reward

    .venv/bin/python bench/parity/parity.py mps --source /path/to/Kwai-Kolors/MPS
    .venv/bin/python bench/parity/parity.py laion_aesthetic --source /path/to/improved-aesthetic-predictor

Rewards covered: ``hpsv2`` (package ``hpsv2``), ``image_reward`` (package ``image-reward``), and two whose code
is a repository, not a package: ``mps`` (Kwai-Kolors/MPS) and ``laion_aesthetic``
(christophschuhmann/improved-aesthetic-predictor), run from the user's checkout (``--source``; nothing of
theirs is copied here). The others are in ``NOT_RUN`` with what stops them (bench/parity/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
# Side environments live outside the repository (never committed); SYNPREF_PARITY_VENVS moves them.
VENVS = Path(os.environ.get("SYNPREF_PARITY_VENVS", "/work/wt/parity-venvs"))
PROMPTS = ["a photograph of an astronaut", "a cup of coffee on a table", "a cat looking at the camera",
           "A rocket on a launch pad at dusk, cinematic lighting, highly detailed, 8k, trending on artstation, "
           "volumetric fog, dramatic sky, wide angle lens, golden hour, award winning photograph"]


MATPLOTLIB = ["matplotlib==3.10.3", "contourpy==1.3.2", "cycler==0.12.1", "fonttools==4.58.0", "kiwisolver==1.4.8",
              "pyparsing==3.2.3"]


@dataclass
class Package:
    """What the side environment installs (all ``--no-deps``, from PyPI)."""
    requirement: str
    pins: list[str] = field(default_factory=list)  # the authors' own pins, and what those need to import
    source: str = ""  # the authors' repository when their code is not on PyPI: the user's checkout, --source


PACKAGES = {
    "hpsv2": Package("hpsv2==1.2.0", ["clint"]),
    # image-reward pins timm 0.6.13 and fairscale 0.4.13; its BLIP text encoder imports helpers that
    # transformers 5 removed, so the side environment has a transformers 4 (with its tokenizers / hub).
    "image_reward": Package("image-reward==1.5", ["timm==0.6.13", "fairscale==0.4.13", "transformers==4.46.3",
                                                   "tokenizers==0.20.3", "huggingface_hub==0.26.5",
                                                   "openai-clip==1.0.1"]),  # its __init__ imports clip
    # MPS is a repository (no package): its requirements.txt pins transformers 4.27.3, the version its release
    # pickle was written with; its evaluation script also imports einops, fire, cv2 and matplotlib.
    "mps": Package("transformers==4.27.3", ["tokenizers==0.13.3", "huggingface_hub==0.13.4", "einops==0.8.1",
                                            "fire==0.4.0", "termcolor", "opencv-python-headless==4.12.0.88",
                                            *MATPLOTLIB], source="github.com/Kwai-Kolors/MPS"),
    # improved-aesthetic-predictor is a repository (no package): simple_inference.py imports OpenAI's clip,
    # pytorch_lightning (its MLP is a LightningModule) and matplotlib.
    "laion_aesthetic": Package("openai-clip==1.0.1", ["pytorch-lightning==2.5.1", "lightning-utilities==0.14.3",
                                                       "torchmetrics==1.7.1", *MATPLOTLIB],
                               source="github.com/christophschuhmann/improved-aesthetic-predictor"),
}
NOT_RUN = {
    "vqascore": "CLIP-FlanT5-XL is 3.09B parameters (12.4 GB in float32 per side, about 2 TFLOP per image) and "
                "t2v-metrics 3.0 pins a stack of its own (torch 2.5.1, transformers 4.49, deepspeed, apex...): "
                "too large for a 2-core, 23 GB machine in a few minutes",
    "hpsv3": "Qwen2-VL-7B is 8.3B parameters (33 GB in float32): does not fit a 23 GB machine once, let "
             "alone twice",
}


def photographs() -> list[np.ndarray]:
    """Real photographs at several sizes and aspect ratios (scikit-image's bundled samples, and crops)."""
    from skimage import data

    astronaut, coffee, chelsea, rocket = data.astronaut(), data.coffee(), data.chelsea(), data.rocket()
    return [astronaut, coffee, chelsea, rocket, coffee[:, :150], astronaut[100:164, :]]  # tall, very wide


def make_venv(reward: str, root: Path) -> Path:
    """The reward's virtual environment with the authors' package, reusing synpref's site-packages."""
    venv = root / reward
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        package = PACKAGES[reward]
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "setuptools", "wheel", "packaging"], check=True)  # to build sdists such as clint
        # Installed before the stack is visible: building an sdist then sees none of its plug-ins.
        subprocess.run([*pip, "--no-deps", "--no-build-isolation", package.requirement, *package.pins], check=True)
        # Lower priority than the venv's own packages: the authors' package (and its pins) win.
        stack = [p for p in sys.path if p.endswith("site-packages")]  # this interpreter's, chained ones included
        Path(site, "synpref-stack.pth").write_text("".join(f"{p}\n" for p in stack))
        if reward == "hpsv2":
            # The hpsv2 1.2.0 wheel lacks its tokenizer's vocabulary (bpe_simple_vocab_16e6.txt.gz): put back
            # the same file (OpenAI CLIP's BPE merges, which open_clip ships).
            import shutil

            from open_clip.tokenizer import default_bpe

            shutil.copy(default_bpe(), Path(site, "hpsv2", "src", "open_clip", "bpe_simple_vocab_16e6.txt.gz"))
    return python


def original(python: Path, reward: str, job: dict, workdir: Path, mode: str = "score") -> dict:
    """Run ``original_<reward>.py <mode> job.json`` in the side environment; its last stdout line is JSON."""
    path = workdir / f"job_{mode}.json"
    path.write_text(json.dumps(job))
    proc = subprocess.run([str(python), str(HERE / f"original_{reward}.py"), mode, str(path)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"original {reward} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ per reward: release files, both sides


def setup_hpsv2(python: Path, workdir: Path, source=None) -> tuple[dict, dict]:
    """Random ViT-H-14 weights saved as the release saves them: torch.save({"state_dict": ...})."""
    checkpoint = workdir / "HPS_v2.1_compressed.pt"
    if not checkpoint.exists():
        import open_clip

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        torch.save({"state_dict": model.state_dict()}, checkpoint)
    job = {"checkpoint": str(checkpoint), "version": "v2.1"}
    return job, {"checkpoint": str(checkpoint), "version": "v2.1", "device": "cpu"}


# BERT's layout: [PAD] 0, [unused0-98], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then word pieces.
# Some prompt words are whole tokens, others only split into pieces (astro ##naut), some not at all ([UNK]).
_WORDS = ("a photograph of an cup coffee on table cat looking at the camera rocket launch pad dusk cinematic "
          "light ##ing high ##ly detailed 8 ##k trend on art ##station vol ##umetric fog dramatic sky wide angle "
          "lens golden hour award winning photo ##graph astro ##naut , .").split()


def bert_vocab(folder: Path, size: int = 30522) -> None:
    """A bert-base-uncased-shaped vocabulary (30522 entries, its special-token ids); the real one is a
    download, and both sides load this same file, so it tests their tokenizers against each other."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [w for w in dict.fromkeys(chars + [f"##{c}" for c in chars] + _WORDS) if w not in vocab]
    vocab += [f"[unused{i}]" for i in range(99, 99 + size - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")


# The release's med_config.json (BLIP's BERT-base with cross-attention; encoder_width is stale: 768).
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
              "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}


def setup_image_reward(python: Path, workdir: Path, source=None) -> tuple[dict, dict]:
    """ImageReward.pt = the authors' ImageReward module's state dict (built by their code in the side
    environment, so it is the release's format by construction), random, with a head that varies."""
    tokenizer, med = workdir / "bert-base-uncased", workdir / "med_config.json"
    bert_vocab(tokenizer)
    med.write_text(json.dumps(MED_CONFIG, indent=2))
    checkpoint = workdir / "ImageReward.pt"
    job = {"checkpoint": str(checkpoint), "med_config": str(med), "tokenizer": str(tokenizer), "seed": 0}
    if not checkpoint.exists():
        original(python, "image_reward", job, workdir, mode="make")
    return job, {"checkpoint": str(checkpoint), "med_config": str(med), "tokenizer": str(tokenizer),
                 "device": "cpu"}


# The LAION CLIP-H config.json (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), the architecture MPS builds its CLIP from.
CLIP_H_CONFIG = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 1024,
                 "logit_scale_init_value": 2.6592, "initializer_factor": 1.0,
                 "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                 "num_hidden_layers": 24, "max_position_embeddings": 77, "vocab_size": 49408,
                                 "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 1024,
                                 "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
                 "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                                   "num_hidden_layers": 32, "patch_size": 14, "image_size": 224, "hidden_act": "gelu",
                                   "layer_norm_eps": 1e-5, "projection_dim": 1024}}
# Its preprocessor_config.json and tokenizer_config.json (pad = <|endoftext|>, as LAION's).
CLIP_H_PREPROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                       "feature_extractor_type": "CLIPFeatureExtractor",
                       "image_mean": [0.48145466, 0.4578275, 0.40821073],
                       "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
CLIP_H_TOKENIZER = {"unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>", "add_prefix_space": False, "errors": "replace",
                    "do_lower_case": True, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}


def clip_h_processor(folder: Path) -> None:
    """The LAION CLIP-H repo's config, processor and tokenizer files (the BPE vocabulary from open_clip's copy
    of OpenAI's, the same 49408 tokens); both sides read this folder."""
    from synpref.demo.tiny_models import _write_clip_tokenizer_files

    _write_clip_tokenizer_files(folder)
    (folder / "config.json").write_text(json.dumps(CLIP_H_CONFIG, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_H_PREPROCESSOR, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(CLIP_H_TOKENIZER, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: CLIP_H_TOKENIZER[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")}))


def setup_mps(python: Path, workdir: Path, source: Path) -> tuple[dict, dict]:
    """MPS_overall_checkpoint.pth = a whole pickled float16 module of the authors' ``trainer.models.clip_model.
    CLIPModel`` (built by their code in the side environment, random weights), and its safetensors
    conversion by synpref's own ``convert`` command (run in the side environment, which can un-pickle it)."""
    processor, checkpoint = workdir / "CLIP-ViT-H-14", workdir / "MPS_overall_checkpoint.pth"
    converted = workdir / "MPS_overall.safetensors"
    clip_h_processor(processor)
    job = {"source": str(source), "checkpoint": str(checkpoint), "processor": str(processor), "seed": 0}
    if not checkpoint.exists():
        original(python, "mps", job, workdir, mode="make")
    if not converted.exists():
        # synpref's own command, in the side environment (its transformers un-pickles the module); the stack's
        # site-packages are added as site dirs there so that synpref's editable install is found.
        stack = [p for p in sys.path if p.endswith("site-packages")]
        code = (f"import site, sys\nfor p in {stack!r}: site.addsitedir(p)\n"
                f"from synpref.transforms.rewards.mps import main\n"
                f"sys.exit(main(['convert', {str(checkpoint)!r}, {str(converted)!r}]))")
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=workdir,
                              env={**os.environ, "PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1"})
        if proc.returncode:
            raise SystemExit(f"mps convert failed:\n{proc.stderr[-3000:]}")
    return job, {"checkpoint": str(converted), "processor": str(processor), "device": "cpu"}


def setup_laion_aesthetic(python: Path, workdir: Path, source: Path) -> tuple[dict, dict]:
    """The repository's own released head (``sac+logos+ava1-l14-linearMSE.pth``, real weights) on OpenAI's
    CLIP ViT-L/14 with random weights, written by OpenAI's ``clip`` code as its release is (TorchScript, float16
    values); synpref reads the same weights as a plain state dict (its ``checkpoint`` parameter)."""
    checkpoint, state = workdir / "ViT-L-14.pt", workdir / "ViT-L-14.state_dict.pt"
    job = {"source": str(source), "clip_checkpoint": str(checkpoint), "clip_state_dict": str(state), "seed": 0}
    if not checkpoint.exists() or not state.exists():
        original(python, "laion_aesthetic", job, workdir, mode="make")
    return job, {"head": str(source / "sac+logos+ava1-l14-linearMSE.pth"), "model": "ViT-L-14-quickgelu",
                 "checkpoint": str(state), "device": "cpu"}


SETUPS = {"hpsv2": setup_hpsv2, "image_reward": setup_image_reward, "mps": setup_mps,
          "laion_aesthetic": setup_laion_aesthetic}


def source_files(source: Path) -> str:
    """sha256 over the checkout's tracked-looking files (.py and .pth): the original's code and release files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.suffix in (".py", ".pth") and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(source)).encode() + path.read_bytes())
    return digest.hexdigest()


def same_order(original_scores: np.ndarray, mine: np.ndarray) -> bool:
    """No pair that the original orders strictly is ordered the other way (ties, e.g. one image scored with
    several prompts by a prompt-free reward, have no order to keep)."""
    do, dm = original_scores[:, None] - original_scores[None], mine[:, None] - mine[None]
    return bool(((do != 0) & (do * dm <= 0)).sum() == 0)


def run(reward: str, workdir: Path, side: str = "both", source: Path | None = None) -> dict:
    from PIL import Image

    from synpref.transforms.rewards import create_reward

    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    python = make_venv(reward, VENVS)
    items = []
    for i, pixels in enumerate(photographs()):
        path = workdir / f"photo{i}.png"
        Image.fromarray(pixels).convert("RGB").save(path)
        for prompt in (PROMPTS[0::2], PROMPTS[1::2], PROMPTS[:3])[i % 3]:
            items.append((str(path), prompt))
    job, params = SETUPS[reward](python, workdir, source)
    job = {**job, "items": items}
    # The original's scores are kept with what determines them (the job, its files by size and mtime, the
    # package, the script): a rerun that changes only synpref's side, or one split across two locked runs
    # (--side original, then both), does not score with the original again.
    files = {k: [os.path.getsize(v), os.path.getmtime(v)] for k, v in job.items() if isinstance(v, str) and
             os.path.exists(v)}
    files["code"] = [PACKAGES[reward].requirement, *PACKAGES[reward].pins,
                     hashlib.sha256((HERE / f"original_{reward}.py").read_bytes()).hexdigest()]
    if source is not None:
        files["source"] = [source_files(source)]
    cache = workdir / "original_scores.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    # compared as JSON: the job's (path, prompt) tuples come back from the cache as lists
    if cached.get("job") == json.loads(json.dumps(job)) and cached.get("files") == json.loads(json.dumps(files)):
        scores, original_s = cached["scores"], cached["seconds"]
    else:
        started = time.perf_counter()
        scores = original(python, reward, job, workdir)["scores"]
        original_s = round(time.perf_counter() - started, 1)
        cache.write_text(json.dumps({"job": job, "files": files, "scores": scores, "seconds": original_s}))
    if side == "original":
        return {"reward": reward, "original_scored": len(scores), "seconds": {"original": original_s}}
    original_scores = np.array(scores, dtype=np.float64)

    started = time.perf_counter()
    ours = create_reward(reward, params)
    ours.load()
    by_prompt: dict[str, list[int]] = {}
    for n, (_, prompt) in enumerate(items):
        by_prompt.setdefault(prompt, []).append(n)
    mine = np.zeros(len(items))
    for prompt, rows in by_prompt.items():  # one call per prompt, as the pipeline groups a prompt's candidates
        images = [Image.open(items[n][0]).convert("RGB") for n in rows]
        mine[rows] = ours.score_batch(images, [prompt] * len(rows))
    synpref_s = time.perf_counter() - started

    diff = np.abs(mine - original_scores)
    rel = diff / np.maximum(np.abs(original_scores), 1e-12)
    spread = float(original_scores.max() - original_scores.min())
    result = {"reward": reward, "package": PACKAGES[reward].requirement, "source": str(source or ""),
              "torch": torch.__version__,
              "pairs": len(items), "images": len(photographs()), "prompts": len(by_prompt),
              "max_abs_diff": float(diff.max()), "max_rel_diff": float(rel.max()),
              "max_diff_over_spread": float(diff.max()) / max(spread, 1e-12),
              "same_order": same_order(original_scores, mine),
              "seconds": {"original": original_s, "synpref": round(synpref_s, 1)},
              "original": original_scores.tolist(), "synpref": mine.tolist()}
    (workdir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reward", choices=sorted(PACKAGES) + sorted(NOT_RUN))
    parser.add_argument("--workdir", default="/tmp/synpref-parity")
    parser.add_argument("--side", choices=("both", "original"), default="both",
                        help="original: only score with the authors' code (kept in the workdir for the next run)")
    parser.add_argument("--source", help="the user's checkout of the authors' repository, for rewards whose code "
                                             "is not on PyPI (mps: Kwai-Kolors/MPS; laion_aesthetic: "
                                             "christophschuhmann/improved-aesthetic-predictor); never copied")
    args = parser.parse_args(argv)
    if args.reward in NOT_RUN:
        print(f"{args.reward}: not run: {NOT_RUN[args.reward]}", file=sys.stderr)
        return 2
    source = None
    if PACKAGES[args.reward].source:
        if not args.source or not Path(args.source, ".").is_dir():
            print(f"{args.reward}: needs --source DIR, a checkout of {PACKAGES[args.reward].source}", file=sys.stderr)
            return 2
        source = Path(args.source).resolve()
    result = run(args.reward, Path(args.workdir) / args.reward, args.side, source)
    print(json.dumps({k: v for k, v in result.items() if k not in ("original", "synpref")}))
    return 0 if result.get("max_rel_diff", 0.0) <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
