"""VLM judges on a tiny randomly initialised Qwen2-VL, saved and loaded like a real checkpoint.

The expected values are computed here by hand: the test renders the chat itself, runs the model
one conversation at a time, and takes the softmax over the answer tokens' logits.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from synpref.transforms.rewards import create_reward
from synpref.transforms.rewards.vlm_judge import parse_likert, single_token_id
from tiny_qwen2_vl import tiny_qwen2_vl

CORPUS = ("You are a helpful assistant. Does this image show: a red cube? Answer Yes or No. Yes No "
          "Which image better matches? Answer A or B. Image A: Image B: A B Rate it on a scale from 1 to 5. "
          "Score: 0 1 2 3 4 5 6 7 8 9")
BUDGET = 56 * 56  # max_pixels the rewards get: a 100x100 image becomes 56x56 = 4x4 patches = 4 tokens


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A Qwen2-VL with 1 vision block (embed 16) and 1 text layer (hidden 32), a 300-token byte-level BPE."""
    model, processor, _ = tiny_qwen2_vl([CORPUS] * 5, vocab_size=300, num_layers=1, max_positions=512)
    path = tmp_path_factory.mktemp("tiny_qwen2_vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def by_hand(tiny_vlm):
    """The test's own copy of the model and processor, and a one-conversation P(first answer)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm)
    processor.image_processor.size = type(processor.image_processor.size)(shortest_edge=28 * 28, longest_edge=BUDGET)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32).eval()
    vocab = processor.tokenizer.get_vocab()

    def inputs(content, images):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        return processor(text=[text], images=images, return_tensors="pt")

    def p_first(content, images, first, second):
        with torch.no_grad():
            logits = model(**inputs(content, images)).logits[0, -1]
        pair = torch.stack([logits[vocab[first]], logits[vocab[second]]]).double()
        return float(torch.softmax(pair, 0)[0])

    return {"processor": processor, "model": model, "inputs": inputs, "p_first": p_first}


def pictures(n, seed=0, size=100):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def judge(name, path, **params):
    reward = create_reward(name, {"model": path, "device": "cpu", "dtype": "float32", "max_pixels": BUDGET,
                                  **params})
    reward.load()
    return reward


def question(prompt):
    return f'Does this image show: "{prompt}"? Answer Yes or No.'


def test_yes_prob_is_the_yes_no_softmax_batched_with_left_padding(tiny_vlm, by_hand):
    images = pictures(3)
    prompts = ["a red cube", "two cats sleeping on a very long green sofa near a window", "sky"]
    batched = judge("vlm_judge", tiny_vlm, batch_size=8)
    scores = batched.score_batch(images, prompts)
    one_by_one = judge("vlm_judge", tiny_vlm, batch_size=1).score_batch(images, prompts)

    lengths, expected = [], []
    for im, p in zip(images, prompts):
        content = [{"type": "image"}, {"type": "text", "text": question(p)}]
        lengths.append(by_hand["inputs"](content, [im])["input_ids"].shape[1])
        expected.append(by_hand["p_first"](content, [im], "Yes", "No"))
    assert len(set(lengths)) == 3  # the batch really is padded
    assert scores == pytest.approx(expected, abs=1e-5)
    assert one_by_one == pytest.approx(scores, abs=1e-5)
    assert max(scores) - min(scores) > 1e-3  # the check is not vacuous: answers differ
    # The reward's processor applies max_pixels: 100x100 -> 56x56 -> a 1x4x4 patch grid.
    grid = batched._chat.inputs([[images[0], "x"]])["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]


def test_pairwise_is_the_both_orders_mean_win_probability_and_order_free(tiny_vlm, by_hand):
    images, prompt = pictures(3, seed=1), "a red cube"
    reward = judge("vlm_pairwise_judge", tiny_vlm, batch_size=4)
    scores = reward.score_batch(images, [prompt] * 3)

    q = f'Which image better matches "{prompt}"? Answer A or B.'

    def p_a(x, y):  # P(A) with image x shown first, by hand
        content = [{"type": "text", "text": "Image A:"}, {"type": "image"}, {"type": "text", "text": "\nImage B:"},
                   {"type": "image"}, {"type": "text", "text": "\n" + q}]
        return by_hand["p_first"](content, [images[x], images[y]], "A", "B")

    expected = []
    for i in range(3):
        wins = [(p_a(i, j) + (1 - p_a(j, i))) / 2 for j in range(3) if j != i]
        expected.append(sum(wins) / 2)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert sum(scores) == pytest.approx(1.5, abs=1e-9)  # P(i beats j) + P(j beats i) = 1
    assert max(scores) - min(scores) > 1e-3

    for perm in ([2, 0, 1], [1, 2, 0]):
        permuted = reward.score_batch([images[i] for i in perm], [prompt] * 3)
        assert permuted == pytest.approx([scores[i] for i in perm], abs=1e-6)

    # Mixed prompts in one call are grouped; a prompt with one image has no opponent: NaN.
    mixed = reward.score_batch([images[0], pictures(1, seed=5)[0], images[1], images[2]],
                               [prompt, "alone", prompt, prompt])
    assert mixed[0] == pytest.approx(scores[0], abs=1e-6) and mixed[2:] == pytest.approx(scores[1:], abs=1e-6)
    assert math.isnan(mixed[1])


@pytest.mark.parametrize("text, scale, expected", [
    ("Score: 4", 5, 4.0), ("4", 5, 4.0), ("I'd say 7/10", 5, math.nan), ("I'd say 7/10", 10, 7.0),
    ("five", 5, math.nan), ("", 5, math.nan), ("0", 5, math.nan), ("-3", 5, math.nan), ("4.5", 5, math.nan),
    ("4.0", 5, 4.0), ("Rating: 5.", 5, 5.0), ("Qwen2 says 3", 5, 3.0), ("10", 10, 10.0),
])
def test_likert_parser_reads_the_first_number_and_never_clamps(text, scale, expected):
    got = parse_likert(text, scale)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_likert_mode_parses_the_greedy_answer(tiny_vlm, by_hand, monkeypatch):
    images, prompts = pictures(2, seed=2), ["a red cube", "sky"]
    reward = judge("vlm_judge", tiny_vlm, mode="likert", max_new_tokens=3)
    scores = reward.score_batch(images, prompts)
    processor, model = by_hand["processor"], by_hand["model"]
    for im, p, s in zip(images, prompts, scores):
        text = ('How well does this image match the description "%s"? Rate it on a scale from 1 to 5, where 1 means '
                'not at all and 5 means perfectly. Answer with a single number.' % p)
        batch = by_hand["inputs"]([{"type": "image"}, {"type": "text", "text": text}], [im])
        out = model.generate(**batch, max_new_tokens=3, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        answer = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        expected = parse_likert(answer, 5)
        assert (math.isnan(s) and math.isnan(expected)) or s == expected
    # The mapping from answers to scores, with the answers fixed:
    monkeypatch.setattr(reward._chat, "generate", lambda convs, n: ["Score: 4", "7/10", "five"][:len(convs)])
    got = reward.score_batch(pictures(3), ["a", "b", "c"])
    assert got[0] == 4.0 and math.isnan(got[1]) and math.isnan(got[2])


def test_answer_tokens_must_be_single_tokens(by_hand):
    tokenizer = by_hand["processor"].tokenizer
    assert single_token_id(tokenizer, "Yes") == tokenizer.get_vocab()["Yes"]
    assert len(tokenizer.encode("Maybe", add_special_tokens=False)) > 1
    with pytest.raises(ValueError, match="'Maybe' is not a single token"):
        single_token_id(tokenizer, "Maybe")


def test_trust_remote_code_is_false_unless_set(tiny_vlm, tmp_path, monkeypatch):
    import transformers

    seen = []
    for cls in (transformers.AutoModelForImageTextToText, transformers.AutoProcessor):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "missing")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    judge("vlm_judge", tiny_vlm)
    assert sorted(seen) == [("AutoModelForImageTextToText", False), ("AutoProcessor", False)]
    assert create_reward("vlm_judge", {"model": tiny_vlm, "trust_remote_code": True})._chat.load_kwargs() == {
        "trust_remote_code": True}

    # A checkpoint that needs its own code is refused, and its code never runs.
    (tmp_path / "config.json").write_text('{"model_type": "tiny_remote_vlm", "auto_map": {"AutoConfig": '
                                          '"configuration_x.XConfig", "AutoProcessor": "processing_x.XProcessor", '
                                          '"AutoModelForImageTextToText": "modeling_x.X"}}')
    for module in ("configuration_x", "processing_x", "modeling_x"):
        (tmp_path / f"{module}.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        create_reward("vlm_pairwise_judge", {"model": str(tmp_path), "processor": tiny_vlm, "device": "cpu"}).load()


def test_params_files_and_validation(tiny_vlm):
    reward = create_reward("vlm_pairwise_judge", {"model": tiny_vlm})
    assert reward.files() == {"model": tiny_vlm, "processor": tiny_vlm}
    assert create_reward("vlm_judge", {"model": "org/vlm", "processor": "org/proc"}).files() == {
        "model": "org/vlm", "processor": "org/proc"}
    described = create_reward("vlm_judge", {"model": tiny_vlm, "mode": "likert", "scale": 7}).describe()
    assert described["name"] == "vlm_judge" and described["params"]["scale"] == 7
    assert described["params"]["trust_remote_code"] is False
    for name, params, message in [
        ("vlm_judge", {"question_template": "Is this a cat?"}, "must contain {prompt}"),
        ("vlm_judge", {"likert_template": "Rate {prompt} from 1 to {max}"}, "unknown fields"),
        ("vlm_judge", {"question_template": "Is {prompt"}, "not a valid format string"),
        ("vlm_pairwise_judge", {"pairwise_template": "Which is better?"}, "must contain {prompt}"),
        ("vlm_judge", {"mode": "logprob"}, "mode must be"),
        ("vlm_judge", {"scale": 1}, "scale must be"),
        ("vlm_judge", {"dtype": "float64"}, "dtype must be"),
        ("vlm_judge", {"trust_remote_code": "yes"}, "trust_remote_code must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            create_reward(name, {"model": tiny_vlm, **params})
