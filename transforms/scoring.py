"""Score every candidate with an ensemble of rewards: each image decoded once, each preprocessing once.

Rewards in one ``group`` (all of them by default) run in one RunInference step whose model is
the whole ensemble: a call decodes the staged PNGs of its units once, computes each distinct
``preprocess_key`` once (every CLIP-224 reward shares one tensor), and asks every reward. A
reward that raises loses only its own scores for that call (``scoring_error``, stage
``score:<reward>``). Give a large judge its own group to run it in a step of its own, e.g. on
its own accelerator. A unit is every candidate of one prompt (all generators, sorted by id), so
judges that compare candidates (a pairwise VLM judge) see them all; a unit is never split across
calls, so with ``units_per_call: 1`` scores do not depend on how a runner batches work. The first
step to decode an image also computes the facts the candidate filters need (``image_facts``: hash,
grey-level sd, flat share) and puts them on the ``Candidate``, so no pixels leave this step.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference

from ..schemas.config import RewardConfig
from ..schemas.records import Drop
from .candidate_filters import image_facts
from ..core.errors import error_line
from .inference import PluginModelHandler, Work
from .rewards import Reward, create_reward
from .staging import load_staged_image

DROPPED = "dropped"


def score_ensemble(rewards: Sequence[Reward], images: list, prompts: list[str]) -> dict[str, list[float] | str]:
    """Each reward's scores for ``images`` (or a one-line error), sharing preprocessing between rewards.

    Returns ``{reward name: [score per image] | "ErrorType: message"}``.
    """
    shared: dict = {}
    out: dict[str, list[float] | str] = {}
    for reward in rewards:
        start = time.perf_counter()
        try:
            key = reward.preprocess_key()
            if key is None:
                scores = reward.score_batch(images, prompts)
            else:
                if key not in shared:
                    shared[key] = reward.preprocess(images)
                scores = reward.score_preprocessed(shared[key], prompts)
            if len(scores) != len(images):
                raise ValueError(f"returned {len(scores)} scores for {len(images)} images")
            out[reward.name] = [float(s) for s in scores]
        except Exception as e:  # one reward's failure must not cost the others' scores
            out[reward.name] = error_line(e)
        Metrics.counter("synpref", f"score:{reward.name}_ms").inc(int(1000 * (time.perf_counter() - start)))
    return out


class LoadedRewards:
    """The loaded rewards of one group (a class, not a list: Beam keeps models through weak references).

    Callers use its methods only: with ``model_copies`` the model lives in one process per machine and
    workers hold a proxy that forwards method calls (attributes are not reachable through it).
    """

    def __init__(self, rewards: list[Reward]):
        self.rewards = rewards

    def score(self, images: list, prompts: list[str]) -> dict[str, list[float] | str]:
        """``score_ensemble`` over these rewards."""
        return score_ensemble(self.rewards, images, prompts)

    def decode_min_sides(self) -> list[tuple[str, int]]:
        """(reward name, its ``decode_min_side()``) in config order (0: reads pixels at full resolution)."""
        return [(r.name, r.decode_min_side()) for r in self.rewards]


class ScoreWithEnsemble(Work):
    """Scoring as a ``Work``: the model is the list of loaded rewards; one result per unit."""

    stage, unit = "score", "images"

    def __init__(self, configs: Sequence[RewardConfig], facts: bool = True):
        self.configs, self.facts = list(configs), facts
        for c in self.configs:
            create_reward(c.name, c.params)  # bad params fail when the pipeline is built, not on workers

    def load(self) -> LoadedRewards:
        rewards = [create_reward(c.name, c.params) for c in self.configs]
        for r in rewards:
            r.load()
        return LoadedRewards(rewards)

    def size(self, unit: list) -> int:
        return len(unit)

    def run(self, model: LoadedRewards, batch: Sequence[list]) -> list:
        flat = [c for unit in batch for c in unit]
        start = time.perf_counter()
        images = [load_staged_image(c.image_uri) for c in flat]  # pixels live only for this call
        Metrics.counter("synpref", "decode_ms").inc(int(1000 * (time.perf_counter() - start)))
        start = time.perf_counter()
        # the candidate filters' facts, once per image (the first reward group computes them)
        facts = [None if c.dhash or not self.facts else image_facts(im) for c, im in zip(flat, images)]
        Metrics.counter("synpref", "image_facts_ms").inc(int(1000 * (time.perf_counter() - start)))
        scores = model.score(images, [c.prompt for c in flat])
        results, offset = [], 0
        for unit in batch:
            results.append({"scores": {name: s if isinstance(s, str) else s[offset:offset + len(unit)]
                                       for name, s in scores.items()},
                            "facts": facts[offset:offset + len(unit)]})
            offset += len(unit)
        return results


def _attach_scores(result: PredictionResult):
    """The unit with this group's scores (and the image facts, if not there yet) added; if a reward
    failed on the call, its candidates are dropped with that reward's error (the first failing
    reward, in config order)."""
    scores, facts = result.inference["scores"], result.inference["facts"]
    failed = [(name, s) for name, s in scores.items() if isinstance(s, str)]
    if failed:
        name, err = failed[0]
        for c in result.example:
            yield beam.pvalue.TaggedOutput(DROPPED, Drop("candidate", "scoring_error", c.candidate_id,
                                                         f"score:{name}", err))
        return
    yield [dataclasses.replace(c, scores={**c.scores, **{name: s[i] for name, s in scores.items()}},
                               **(facts[i] or {}))
           for i, c in enumerate(result.example)]


def _failed_units(failure, names: str):
    batch, exc = failure
    for unit in batch:
        for c in unit:
            yield Drop("candidate", "scoring_error", c.candidate_id, f"score:{names}", error_line(exc))


def _check_scores(unit: list):
    """Drop a candidate with a non-finite score (fp16 models produce NaN); key the rest by prompt."""
    for c in unit:
        bad = sorted(name for name, s in c.scores.items() if not math.isfinite(s))
        if bad:
            yield beam.pvalue.TaggedOutput(DROPPED, Drop("candidate", "nan_score", c.candidate_id,
                                                         f"score:{bad[0]}", "non-finite score from " + ", ".join(bad)))
        else:
            yield c.prompt_id, c


def reward_groups(rewards: Sequence[RewardConfig]) -> list[list[RewardConfig]]:
    """Rewards grouped by ``group`` in config order (one RunInference step per group)."""
    groups: dict[str, list[RewardConfig]] = {}
    for r in rewards:
        groups.setdefault(r.group, []).append(r)
    return list(groups.values())


def _one_unit(element) -> list:
    _, units = element
    return sorted((c for unit in units for c in unit), key=lambda c: c.candidate_id)


class ScoreCandidates(beam.PTransform):
    """units (any grouping) -> (prompt_id, Candidate with every reward's score); drops on the side."""

    def __init__(self, rewards: Sequence[RewardConfig], expected_images: Optional[int] = None,
                 torch_threads: int = 1, image_facts: bool = True):
        super().__init__()
        self.rewards, self.total, self.threads = list(rewards), expected_images, torch_threads
        self.facts = image_facts  # False: no candidate filter reads them (``synpref evaluate``)

    def expand(self, units):
        dropped = []
        units = (units
                 | "KeyByPrompt" >> beam.Map(lambda unit: (unit[0].prompt_id, unit))
                 | "CandidatesOfAPrompt" >> beam.GroupByKey()  # ids and URIs only: no pixels in this shuffle
                 | "OneUnitPerPrompt" >> beam.Map(_one_unit))
        for group in reward_groups(self.rewards):
            names = ",".join(r.name for r in group)
            handler = PluginModelHandler(
                ScoreWithEnsemble(group, self.facts), f"score_{names}", batch_size=min(r.units_per_call for r in group),
                model_copies=max(r.model_copies for r in group), torch_threads=self.threads, total=self.total)
            score = RunInference(handler)
            accelerator = next((r.accelerator for r in group if r.accelerator), "")
            if accelerator:
                score = score.with_resource_hints(accelerator=accelerator)
            inference, failures = units | f"Score[{names}]" >> score.with_exception_handling()
            attached = inference | f"Attach[{names}]" >> beam.FlatMap(_attach_scores).with_outputs(
                DROPPED, main="units")
            dropped += [attached[DROPPED],
                        failures.failed_inferences | f"ScoringErrors[{names}]" >> beam.FlatMap(_failed_units, names)]
            units = attached.units  # the next group scores what this one kept
        checked = units | "CheckScores" >> beam.FlatMap(_check_scores).with_outputs(DROPPED, main="scored")
        dropped.append(checked[DROPPED])
        return {"scored": checked.scored, "dropped": dropped | "ScoringDrops" >> beam.Flatten()}
