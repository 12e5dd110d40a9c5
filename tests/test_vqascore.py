"""VQAScore (CLIP-FlanT5) on a tiny random CLIP vision tower + projector + T5, saved like the release.

The release's state dict is written with the original ``CLIPT5ForConditionalGeneration`` key names
(``vision_tower.vision_tower.*``, ``mm_projector.0/2.*``, T5 names and the ``embed_tokens.weight`` alias)
and loaded through the reward's real loading code. The expected score is computed here independently:
expand2square + the PIL CLIP image processor, a vision tower cut to its first L-1 layers (its last hidden
state is the penultimate layer's), the projector with torch functional, the embeddings spliced by hand,
and transformers' own T5 loss with ``labels`` = the answer tokens: score = exp(-loss).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from synpref.transforms.rewards import create_reward
from synpref.transforms.rewards.vqascore import CLIP_MEAN, CLIP_STD, SYSTEM_MSG, expand2square_clip

SIZE = 56  # 4x4 patches of 14: the recipe is the 336 one, parameterised by the tower's image_size
EXTRA_ROWS = 4  # T5 embedding rows beyond the tokenizer, as FlanT5's 32128 vs 32100
CORPUS = [SYSTEM_MSG, "USER: ASSISTANT: Does this figure show a red cube on a table? Please answer yes or no.",
          "Yes No a blue sphere, a cat sitting on the grass in the garden at night", "yes no the of and"] * 20


def expand2square(im, colour):
    """Written out again here: pad to square at the original resolution, image centred (floored offsets)."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new(im.mode, (side, side), colour)
    out.paste(im, ((side - w) // 2, 0) if h > w else (0, (side - h) // 2))
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast, T5Config, \
        T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("vqascore")
    torch.manual_seed(0)
    # a T5-like Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, Metaspace, "</s>" appended to every piece
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    n_vocab = len(fast)

    tcfg = T5Config(vocab_size=n_vocab + EXTRA_ROWS, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                    num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)
    tcfg.save_pretrained(root / "t5")
    t5 = T5ForConditionalGeneration(tcfg)
    with torch.no_grad():
        # logits of order 1, so scores differ between inputs; the last EXTRA_ROWS rows are the ones the original
        # drops (resize to len(tokenizer)): kept, they would shift every probability by a few per cent
        t5.lm_head.weight.copy_(torch.randn_like(t5.lm_head.weight) * 0.3)
    vcfg = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                            image_size=SIZE, patch_size=14, projection_dim=16)
    vision = CLIPVisionModel(vcfg)
    vision.save_pretrained(root / "tower")
    proj = {"mm_projector.0.weight": torch.randn(32, 24) * 0.5, "mm_projector.0.bias": torch.randn(32) * 0.1,
            "mm_projector.2.weight": torch.randn(32, 32) * 0.5, "mm_projector.2.bias": torch.randn(32) * 0.1}
    state = {f"vision_tower.vision_tower.{k}": v.clone() for k, v in vision.state_dict().items()}
    state.update(proj)
    state.update({k: v.clone() for k, v in t5.state_dict().items()})
    state["embed_tokens.weight"] = state["shared.weight"].clone()
    torch.save(state, root / "pytorch_model.bin")
    return {"root": root, "state": state, "tcfg": tcfg, "vcfg": vcfg, "tokenizer": fast, "n_vocab": n_vocab}


def params(release, **kw):
    r = release["root"]
    return {"checkpoint": str(r / "pytorch_model.bin"), "t5_config": str(r / "t5"), "tokenizer": str(r / "tokenizer"),
            "vision_tower": str(r / "tower"), "image_size": SIZE, "device": "cpu", **kw}


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            [(40, 70), (90, 50), (56, 56), (30, 30), (61, 33)]]


PROMPTS = ["a red cube", "a cat sitting on the grass in the garden at night", "a blue sphere on a table",
           "a cat", "the red and blue cube on the grass"]


def clip_pixels(im):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
    padded = expand2square(im.convert("RGB"), tuple(int(x * 255) for x in CLIP_MEAN))
    return torch.as_tensor(np.asarray(proc(images=[padded], return_tensors="pt")["pixel_values"]))


def reference_score(release, im, prompt, answer="Yes"):
    from transformers import CLIPVisionModel, T5ForConditionalGeneration

    state, tok, n = release["state"], release["tokenizer"], release["n_vocab"]
    vcfg = release["vcfg"].__class__(**{**release["vcfg"].to_dict(), "num_hidden_layers": 2})  # first L-1 layers
    short = CLIPVisionModel(vcfg)
    prefix = "vision_tower.vision_tower."
    missing, _ = short.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                       strict=False)
    assert not missing
    tcfg = release["tcfg"].__class__(**{**release["tcfg"].to_dict(), "vocab_size": n})
    t5 = T5ForConditionalGeneration(tcfg).eval()
    t5_state = {k: v for k, v in state.items() if k in t5.state_dict()}
    for k in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        t5_state[k] = state[k if k in state else "shared.weight"][:n]
    t5.load_state_dict(t5_state, strict=True)
    with torch.no_grad():
        feats = short.eval()(pixel_values=clip_pixels(im)).last_hidden_state[0, 1:]
        img = F.linear(F.gelu(F.linear(feats, state["mm_projector.0.weight"], state["mm_projector.0.bias"])),
                       state["mm_projector.2.weight"], state["mm_projector.2.bias"])
        question = f'Does this figure show "{prompt}"? Please answer yes or no.'
        first = tok(SYSTEM_MSG + " USER: ").input_ids  # ends with </s>, as in the original
        second = tok("\n" + question + " ASSISTANT: ").input_ids
        emb = state["shared.weight"]
        inputs = torch.cat([emb[first], img, emb[second]])[None]
        labels = torch.tensor([tok(answer).input_ids])
        loss = t5(inputs_embeds=inputs, labels=labels).loss  # mean cross-entropy over the answer tokens
    return math.exp(-float(loss))


def test_preprocessing_matches_expand2square_and_clip_processor():
    ims = images()
    ours = expand2square_clip(ims, SIZE)
    for i, im in enumerate(ims):
        torch.testing.assert_close(ours[i:i + 1], clip_pixels(im), atol=1e-5, rtol=0)
    # the fill is the CLIP mean colour in pixels, (122, 116, 104): a wide image's top row is that colour
    top = ours[0, :, 0, SIZE // 2]
    expected = (torch.tensor([122, 116, 104]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(top, expected.float(), atol=1e-6, rtol=0)


def test_score_equals_independent_computation_and_batching(release):
    reward = create_reward("vqascore", params(release, batch_size=5))
    ims = images()
    batched = reward.score_batch(ims, PROMPTS)
    expected = [reference_score(release, im, p) for im, p in zip(ims, PROMPTS)]
    np.testing.assert_allclose(batched, expected, rtol=1e-4, atol=0)
    assert max(batched) / min(batched) > 1.01  # not a constant
    assert all(0.0 < s < 1.0 for s in batched)
    single = create_reward("vqascore", params(release, batch_size=1))
    np.testing.assert_allclose(single.score_batch(ims, PROMPTS), batched, rtol=1e-5, atol=0)
    # the tokens: question pieces each end with </s>; the answer is "Yes </s>"
    ids, answer = reward.token_ids("a cat")
    assert ids.count(-200) == 1 and ids[ids.index(-200) - 1] == 1 and ids[-1] == 1
    assert answer == release["tokenizer"]("Yes").input_ids and answer[-1] == 1


def test_answer_with_prompt_pads_labels_and_sum_reduction(release):
    ims, prompts = images()[:3], PROMPTS[:3]
    tmpl = 'Yes, "{}"'
    batched = create_reward("vqascore", params(release, answer_template=tmpl, batch_size=3)).score_batch(ims, prompts)
    expected = [reference_score(release, im, p, answer=tmpl.format(p)) for im, p in zip(ims, prompts)]
    np.testing.assert_allclose(batched, expected, rtol=1e-4, atol=0)
    mean = create_reward("vqascore", params(release)).score_batch(ims, prompts)
    joint = create_reward("vqascore", params(release, reduction="sum")).score_batch(ims, prompts)
    k = len(release["tokenizer"]("Yes").input_ids)
    np.testing.assert_allclose(joint, np.asarray(mean) ** k, rtol=1e-4)


def test_vision_weights_from_the_tower_when_the_checkpoint_lacks_them(release, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous().clone() for k, v in release["state"].items()
             if not k.startswith("vision_tower.") and k not in ("encoder.embed_tokens.weight",
                                                                "decoder.embed_tokens.weight", "embed_tokens.weight")}
    save_file(state, tmp_path / "ckpt.safetensors")
    reward = create_reward("vqascore", params(release, checkpoint=str(tmp_path / "ckpt.safetensors")))
    ims = images()[:2]
    expected = [reference_score(release, im, p) for im, p in zip(ims, PROMPTS[:2])]
    np.testing.assert_allclose(reward.score_batch(ims, PROMPTS[:2]), expected, rtol=1e-4)


def test_unmatched_and_missing_keys_fail_in_one_line(release, tmp_path):
    state = dict(release["state"])
    state["mm_projector.4.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "extra.bin")
    with pytest.raises(ValueError, match=r"1 keys match nothing.*mm_projector\.4\.weight") as err:
        create_reward("vqascore", params(release, checkpoint=str(tmp_path / "extra.bin"))).load()
    assert "\n" not in str(err.value)
    state = {k: v for k, v in release["state"].items() if k != "mm_projector.2.bias"}
    torch.save(state, tmp_path / "missing.bin")
    with pytest.raises(ValueError, match=r"projector.*missing \(1\): linear_2\.bias"):
        create_reward("vqascore", params(release, checkpoint=str(tmp_path / "missing.bin"))).load()


def test_params_files_and_validation(release):
    reward = create_reward("vqascore", params(release))
    assert set(reward.files()) == {"checkpoint", "t5_config", "tokenizer", "vision_tower"}
    defaults = create_reward("vqascore", {"checkpoint": "x.bin"})
    assert defaults.files()["tokenizer"] == "google/flan-t5-xl"
    assert defaults.files()["vision_tower"] == "openai/clip-vit-large-patch14-336"
    assert defaults.question_template == 'Does this figure show "{}"? Please answer yes or no.'
    for bad in ({}, {"checkpoint": "x", "dtype": "float16"}, {"checkpoint": "x", "reduction": "max"},
                {"checkpoint": "x", "question_template": "{a} {b}"}, {"checkpoint": "x", "answer_template": "<image>"}):
        with pytest.raises(ValueError):
            create_reward("vqascore", bad)
