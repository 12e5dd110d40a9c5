"""Prompt reading: every format, every bad line accounted for, seeded sampling."""
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from synpref.schemas.config import PromptsConfig
from synpref.transforms.prompts import ReadPrompts, normalize_prompt, prompt_id_of, read_raw_prompts


def run_read(cfg: PromptsConfig, seed: int = 0, tmp_path=None):
    """Run ReadPrompts; return (sorted prompt texts, sorted (reason, record_id) drops, lines read)."""
    import tempfile

    out_dir = tempfile.mkdtemp(dir=tmp_path)
    views = {"prompts": lambda r: r.prompt, "dropped": lambda d: [d.reason, d.record_id], "read": lambda r: 1}
    with TestPipeline() as p:
        r = p | ReadPrompts(cfg, seed)
        for name, view in views.items():
            (r[name] | f"View{name}" >> beam.Map(lambda x, view=view: json.dumps(view(x)))
             | f"Write{name}" >> beam.io.WriteToText(f"{out_dir}/{name}", num_shards=1, shard_name_template=""))
    got = {name: [json.loads(line) for line in open(f"{out_dir}/{name}")] for name in views}
    return sorted(got["prompts"]), sorted(tuple(d) for d in got["dropped"]), len(got["read"])


def test_bad_lines_are_dropped_with_reasons(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\n".join([
        b"a red cube",                    # 0 kept
        b"   ",                           # 1 empty
        b"x" * 400,                       # 2 too long
        b"a   red\tcube ",                # 3 duplicate of 0 after normalisation
        b"caf\xe9 on a table",            # 4 latin-1, not UTF-8
        b"two green apples",              # 5 kept
    ]))
    src = str(path)
    prompts, drops, read = run_read(PromptsConfig(source=src, max_chars=300))
    assert prompts == ["a red cube", "two green apples"]
    assert drops == [("duplicate", f"{src}#3"), ("empty_prompt", f"{src}#1"),
                     ("non_utf8", f"{src}#4"), ("too_long", f"{src}#2")]
    assert read == 6 == len(prompts) + len(drops)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_structured_formats(tmp_path, fmt):
    rows = [{"caption": "a blue door", "kind": "colour"}, {"caption": "", "kind": "x"},
            {"caption": "three cats", "kind": "counting"}]
    path = tmp_path / f"p.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    elif fmt == "csv":
        path.write_text("caption,kind\n" + "\n".join(f"{r['caption']},{r['kind']}" for r in rows) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = PromptsConfig(source=str(path), text_field="caption", category_field="kind")
    prompts, drops, read = run_read(cfg)
    assert prompts == ["a blue door", "three cats"]
    reasons = sorted(r for r, _ in drops)
    assert reasons == (["empty_prompt", "invalid_row"] if fmt == "jsonl" else ["empty_prompt"])
    assert read == len(prompts) + len(drops)
    raw = list(read_raw_prompts(cfg))
    assert {r.category for r in raw if r.text} >= {"colour", "counting"}


def test_builtin_set_has_64_prompts_over_categories():
    raw = list(read_raw_prompts(PromptsConfig()))
    assert len(raw) == 64 and len({r.text for r in raw}) == 64
    assert {r.category for r in raw} == {"counting", "colour", "attribute_binding", "spatial",
                                         "text_rendering", "style_scene"}


def test_seeded_sample_is_stable_and_accounts_for_the_rest():
    a, drops_a, read = run_read(PromptsConfig(num_prompts=10), seed=7)
    b, _, _ = run_read(PromptsConfig(num_prompts=10), seed=7)
    c, _, _ = run_read(PromptsConfig(num_prompts=10), seed=8)
    assert a == b and a != c and len(a) == 10
    assert [r for r, _ in drops_a] == ["not_sampled"] * 54 and read == 64


def test_prompt_ids_are_content_hashes_of_the_normalised_text():
    assert normalize_prompt("  a\u00a0red   cube\n") == "a red cube"
    assert prompt_id_of("a red cube") == prompt_id_of(normalize_prompt(" a  red cube "))
    assert len(prompt_id_of("x")) == 16


def test_hugging_face_datasets_by_name_or_folder(tmp_path):
    """``format: hf`` goes through ``datasets.load_dataset`` (here a local folder; a hub name works the same)."""
    folder = tmp_path / "my_prompts"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "a red kite"}, {"prompt": "a tin robot"}]),
                   folder / "train-00000.parquet")
    prompts, drops, read = run_read(PromptsConfig(source=str(folder), format="hf"))
    assert prompts == ["a red kite", "a tin robot"] and drops == [] and read == 2


def test_streamed_seeded_sample_is_exactly_the_n_smallest_sample_keys(tmp_path):
    """``SeededSample`` (per-bucket counts, then one bucket's keys) picks the same prompts as sorting every
    sha256(seed:prompt_id), for any bucket width (16 buckets: the boundary bucket is cut inside), n below,
    at and above the prompt count."""
    import hashlib

    from synpref.schemas.records import PromptRecord
    from synpref.transforms.prompts import SeededSample

    texts = [f"prompt number {i}: a {['red', 'blue', 'green'][i % 3]} thing" for i in range(300)]
    records = [PromptRecord(prompt_id_of(t), t, "", "mem", i) for i, t in enumerate(texts)]
    for seed, n, bucket_hex in ((0, 137, 1), (5, 137, 2), (5, 1, 1), (3, 300, 1), (3, 400, 4), (9, 299, 4)):
        ranked = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r.prompt_id}".encode()).hexdigest())
        expected = {r.prompt_id for r in ranked[:n]}
        out = tmp_path / f"{seed}-{n}-{bucket_hex}"
        with TestPipeline() as p:
            split = p | beam.Create(records) | SeededSample(n, seed, bucket_hex)
            _ = (split.ok | "Ids" >> beam.Map(lambda r: r.prompt_id)
                 | "W1" >> beam.io.WriteToText(f"{out}-kept", num_shards=1, shard_name_template=""))
            _ = (split.dropped | "Reasons" >> beam.Map(lambda d: d.reason)
                 | "W2" >> beam.io.WriteToText(f"{out}-dropped", num_shards=1, shard_name_template=""))
        kept = open(f"{out}-kept").read().split()
        dropped = open(f"{out}-dropped").read().split()
        assert len(kept) == len(set(kept)) and set(kept) == expected, (seed, n, bucket_hex)
        assert dropped == ["not_sampled"] * (len(records) - len(expected))
