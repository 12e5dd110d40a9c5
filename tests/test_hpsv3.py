"""HPSv3 on a tiny randomly initialised Qwen2-VL + reward head, saved under the release's key names.

The expected scores are computed here by hand: the test renders the chat text itself, resizes the image to a
size worked out by hand, runs the vision tower and the decoder piece by piece one image at a time (no padding,
positions 0..n-1 on all three rotary axes, as the authors' decoder call gets), takes the final hidden state at
the ``<|Reward|>`` token and applies the head with torch functional ops; score = mu = output[0].
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from synpref.transforms.rewards import create_reward
from synpref.transforms.rewards.hpsv3 import INSTRUCTION, hpsv3_text, smart_resize
from tiny_qwen2_vl import tiny_qwen2_vl

BUDGET = 56 * 56
# Worked out by hand with Qwen's smart_resize at min = max = BUDGET, factor 28: (width, height) -> (height, width)
SIZES = {(100, 100): (56, 56), (120, 60): (28, 56), (64, 90): (56, 28)}


def to_release_names(hf_state):
    """transformers-5 Qwen2VLForConditionalGeneration names -> the HPSv3.safetensors names (transformers < 4.52)."""
    out = {}
    for k, v in hf_state.items():
        if k.startswith("model.visual."):
            k = "visual." + k[len("model.visual."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        out[k] = v.detach().clone().contiguous()
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import Qwen2VLProcessor

    model, processor, tokenizer = tiny_qwen2_vl(
        [INSTRUCTION, "a red cube two cats on a sofa sky"] * 3, vocab_size=700, num_layers=2, max_positions=4096,
        extra_tokens=1, tie_word_embeddings=False)
    base_len = len(tokenizer)  # the base processor has no <|Reward|>: the reward adds it, id = base_len
    config = model.config
    g = torch.Generator().manual_seed(1)
    head = {"rm_head.0.weight": torch.randn(1024, 32, generator=g) * 0.3, "rm_head.0.bias": torch.randn(1024, generator=g) * 0.1,
            "rm_head.3.weight": torch.randn(16, 1024, generator=g) * 0.05, "rm_head.3.bias": torch.randn(16, generator=g) * 0.1,
            "rm_head.5.weight": torch.randn(2, 16, generator=g) * 0.5, "rm_head.5.bias": torch.randn(2, generator=g) * 0.1}
    base = tmp_path_factory.mktemp("qwen2_vl_base")
    config.save_pretrained(base)  # the base model's config (its weights are never read)
    processor.save_pretrained(base)
    state = {**to_release_names(model.state_dict()), **head}
    assert {"visual.merger.mlp.2.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "lm_head.weight"} <= set(state)  # the names the released HPSv3.safetensors uses
    ckpt = base / "HPSv3.safetensors"
    save_file(state, str(ckpt))

    ref_processor = Qwen2VLProcessor.from_pretrained(base)
    ref_processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    return {"base": str(base), "checkpoint": str(ckpt), "model": model, "head": head, "state": state,
            "processor": ref_processor, "reward_id": base_len, "tmp": tmp_path_factory}


def reward_for(release, **params):
    reward = create_reward("hpsv3", {"checkpoint": release["checkpoint"], "base_model": release["base"],
                                     "device": "cpu", "dtype": "float32", "pixels": BUDGET, **params})
    reward.load()
    return reward


def pictures(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def by_hand(release, image, prompt):
    """(mu, sigma, sequence length) for one image, computed without the reward's code."""
    processor, model, head = release["processor"], release["model"], release["head"]
    h, w = SIZES[image.size]
    pixels = image.convert("RGB").resize((w, h), Image.BICUBIC)
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>" + INSTRUCTION.format(text_prompt=prompt)
            + "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
            + "<|im_end|>\n<|im_start|>assistant\n")
    batch = processor(text=[text], images=[pixels], return_tensors="pt")
    ids = batch["input_ids"]
    assert batch["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    assert int((ids == release["reward_id"]).sum()) == 1
    with torch.no_grad():
        lm, visual = model.model.language_model, model.model.visual
        embeds = lm.embed_tokens(ids)
        image_embeds = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        embeds[ids == model.config.image_token_id] = image_embeds
        n = ids.shape[1]
        positions = torch.arange(n).view(1, 1, n).expand(3, 1, n)  # plain text positions, all three axes
        hidden = lm(inputs_embeds=embeds, position_ids=positions).last_hidden_state[0]
        x = hidden[int((ids[0] == release["reward_id"]).nonzero())]
        x = F.relu(F.linear(x, head["rm_head.0.weight"], head["rm_head.0.bias"]))
        x = F.relu(F.linear(x, head["rm_head.3.weight"], head["rm_head.3.bias"]))
        out = F.linear(x, head["rm_head.5.weight"], head["rm_head.5.bias"])
    return float(out[0]), float(out[1]), n


PROMPTS = ["a red cube", "two cats sleeping on a very long green sofa near a window, oil painting", "sky"]


def test_score_is_mu_at_the_reward_token_batched_with_left_padding(release):
    images = pictures(list(SIZES))
    batched = reward_for(release, batch_size=8)
    scores = batched.score_batch(images, PROMPTS)
    one_by_one = reward_for(release, batch_size=1).score_batch(images, PROMPTS)
    expected = [by_hand(release, im, p) for im, p in zip(images, PROMPTS)]
    assert len({n for _, _, n in expected}) == 3  # different lengths: the batch really is padded
    assert scores == pytest.approx([mu for mu, _, _ in expected], abs=1e-5)
    assert one_by_one == pytest.approx(scores, abs=1e-5)
    assert max(scores) - min(scores) > 1e-3  # not vacuous
    sigma = batched.mu_sigma(images, PROMPTS)[:, 1]
    assert sigma.tolist() == pytest.approx([s for _, s, _ in expected], abs=1e-5)


def test_positions_are_the_authors_text_positions_not_mrope(release):
    """The authors' decoder call has no multimodal positions; M-RoPE positions would give another score."""
    image, prompt = pictures([(100, 100)])[0], "a red cube"
    mu, _, _ = by_hand(release, image, prompt)
    processor, model, head = release["processor"], release["model"], release["head"]
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": hpsv3_text(prompt)}]}], add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text], images=[image.resize((56, 56), Image.BICUBIC)], return_tensors="pt")
    with torch.no_grad():  # the stock model computes 3-D M-RoPE positions for the image tokens
        hidden = model.model(**batch).last_hidden_state[0]
        x = hidden[int((batch["input_ids"][0] == release["reward_id"]).nonzero())]
        x = F.relu(F.linear(x, head["rm_head.0.weight"], head["rm_head.0.bias"]))
        x = F.relu(F.linear(x, head["rm_head.3.weight"], head["rm_head.3.bias"]))
        mrope_mu = float(F.linear(x, head["rm_head.5.weight"], head["rm_head.5.bias"])[0])
    assert reward_for(release).score_batch([image], [prompt])[0] == pytest.approx(mu, abs=1e-5)
    assert abs(mrope_mu - mu) > 1e-4


def test_prompt_template_and_pixel_budget():
    text = hpsv3_text("a fox")
    assert text.startswith("\nYou are tasked with evaluating a generated image based on Visual Quality and Text "
                           "Alignment and give a overall score to estimate the human preference.")
    assert "**Visual Quality:**  \n" in text and "**Text Alignment:**  \n" in text
    assert text.endswith("Textual prompt - a fox\n\n\n\nPlease provide the overall ratings of this image: "
                         "<|Reward|>\n\nEND\n")
    budget = 256 * 28 * 28  # the default: 448x448 for square images
    assert smart_resize(1024, 1024, budget, budget) == (448, 448)
    assert smart_resize(512, 512, budget, budget) == (448, 448)
    assert smart_resize(1080, 1920, budget, budget) == (336, 588)
    for (w, h), expected in SIZES.items():
        assert smart_resize(h, w, BUDGET, BUDGET) == expected
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100, budget, budget)


def test_newer_key_layout_loads_and_bad_keys_fail_in_one_line(release):
    from safetensors.torch import save_file

    tmp = release["tmp"].mktemp("variants")
    newer = {}
    for k, v in release["state"].items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        newer[k] = v
    save_file(newer, str(tmp / "newer.safetensors"))
    images = pictures([(100, 100)], seed=3)
    reference = reward_for(release).score_batch(images, ["sky"])
    assert reward_for(release, checkpoint=str(tmp / "newer.safetensors")).score_batch(images, ["sky"]) == \
        pytest.approx(reference, abs=1e-6)

    extra = {**release["state"], "foo.bar": torch.zeros(1)}
    save_file(extra, str(tmp / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unmatched keys \['foo.bar'\]") as err:
        reward_for(release, checkpoint=str(tmp / "extra.safetensors"))
    assert "\n" not in str(err.value)
    missing = {k: v for k, v in release["state"].items() if k != "rm_head.5.bias"}
    save_file(missing, str(tmp / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['rm_head.5.bias'\]"):
        reward_for(release, checkpoint=str(tmp / "missing.safetensors"))


def test_extreme_aspect_ratio_is_nan_and_others_score(release):
    reward = reward_for(release)
    images = pictures([(100, 100)]) + [Image.new("RGB", (2100, 10))]
    scores = reward.score_batch(images, ["sky", "sky"])
    assert math.isnan(scores[1]) and not math.isnan(scores[0])
    # The budget is the reward's, not the processor's (whose own max is 112x112): 224x224 -> 16x16 patches.
    grid = reward_for(release, pixels=224 * 224).inputs(images[:1], ["sky"])["image_grid_thw"]
    assert grid.tolist() == [[1, 16, 16]]


def test_files_params_and_validation(release):
    reward = create_reward("hpsv3", {"checkpoint": "hf://MizzenAI/HPSv3/HPSv3.safetensors"})
    assert reward.files() == {"checkpoint": "hf://MizzenAI/HPSv3/HPSv3.safetensors",
                              "base_model": "Qwen/Qwen2-VL-7B-Instruct", "processor": "Qwen/Qwen2-VL-7B-Instruct"}
    assert reward.params()["pixels"] == 256 * 28 * 28 and reward.params()["dtype"] == "bfloat16"
    described = create_reward("hpsv3", {"checkpoint": release["checkpoint"], "base_model": release["base"]}).describe()
    assert set(described["files"]) == {"checkpoint", "base_model", "processor"}
    for params, message in [({}, "'checkpoint' is required"), ({"checkpoint": "x", "dtype": "float64"}, "dtype"),
                            ({"checkpoint": "x", "pixels": 10}, "pixels"),
                            ({"checkpoint": "x", "batch_size": 0}, "batch_size")]:
        with pytest.raises(ValueError, match=message):
            create_reward("hpsv3", params)
