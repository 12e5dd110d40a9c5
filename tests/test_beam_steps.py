"""Single Beam steps under ``TestPipeline`` + ``assert_that``, each on hand-made input with its expected
output written out here: a step's contract is checked without a whole build around it."""
import hashlib
import unicodedata

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from synpref.schemas.config import FilterConfig, PromptsConfig
from synpref.schemas.records import PreferencePair, PromptRecord, RankedCandidate, RankedGroup
from synpref.transforms.filtering import FilterPairs
from synpref.transforms.prompts import ReadPrompts

LINEAGE = None


def _pid(text: str) -> str:
    cleaned = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.sha256(cleaned.encode("utf-8")).hexdigest()[:16]


def test_read_prompts_cleans_dedupes_and_drops_with_reasons(tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("a red  cube\n\n   \na red cube\nCafe\u0301 at night\n" + "x" * 40 + "\n")
    with TestPipeline() as p:
        out = p | ReadPrompts(PromptsConfig(source=str(src), max_chars=30), seed=0)
        assert_that(out["prompts"] | beam.Map(lambda r: (r.prompt_id, r.prompt)),
                    equal_to([(_pid("a red cube"), "a red cube"), (_pid("Café at night"), "Café at night")]),
                    label="Kept")
        dropped = out["dropped"] if not isinstance(out["dropped"], list) else out["dropped"] | beam.Flatten()
        assert_that(dropped | beam.Map(lambda d: d.reason),
                    equal_to(["empty_prompt", "empty_prompt", "duplicate", "too_long"]), label="Dropped")


def _group(scores_by_candidate: dict[str, list[float]]) -> RankedGroup:
    """A ranked group built by hand: phi = strict wins / (n_rewards * (k - 1)), pairs winner-first."""
    ids = sorted(scores_by_candidate)
    n = len(next(iter(scores_by_candidate.values())))
    k = len(ids)
    wins = {i: sum(a > b for j in ids if j != i for a, b in zip(scores_by_candidate[i], scores_by_candidate[j]))
            for i in ids}
    order = sorted(ids, key=lambda i: (-wins[i], i))
    cands = tuple(RankedCandidate(i, f"mem://{i}.png", "0" * 64, r + 1, wins[i] / (n * (k - 1)),
                                  {f"r{x}": s for x, s in enumerate(scores_by_candidate[i])}, LINEAGE)
                  for r, i in enumerate(order))
    pairs = []
    for a, w in enumerate(order):
        for l in order[a + 1:]:
            votes = sum(x > y for x, y in zip(scores_by_candidate[w], scores_by_candidate[l]))
            pairs.append(PreferencePair("p", w, l, wins[w] / (n * (k - 1)), wins[l] / (n * (k - 1)), votes / n,
                                        votes, n))
    return RankedGroup(PromptRecord("p", "a cube"), tuple(f"r{x}" for x in range(n)), "syn_pic", cands, tuple(pairs))


def test_filter_pairs_keeps_agreed_pairs_and_names_every_drop():
    # a beats b and c on all three rewards; b and c split 2-1 (b) -> margin 2/3 - 1/2 = 1/6
    group = _group({"a": [3.0, 3.0, 3.0], "b": [2.0, 2.0, 1.0], "c": [1.0, 1.0, 2.0]})
    with TestPipeline() as p:
        out = p | beam.Create([group]) | FilterPairs(FilterConfig(min_agreement_margin=0.2))
        assert_that(out["groups"] | beam.FlatMap(lambda g: [(x.winner_id, x.loser_id) for x in g.pairs]),
                    equal_to([("a", "b"), ("a", "c")]), label="Kept")
        assert_that(out["dropped"] | beam.Map(lambda d: (d.reason, d.record_id)),
                    equal_to([("low_agreement", "b__c")]), label="Dropped")
