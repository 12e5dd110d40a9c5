"""Score every candidate with an ensemble of rewards, one RunInference per reward.

A unit (the candidates of one prompt and generator) is scored in one
``score_batch`` call by default, so scores do not depend on how a runner batches
work. Units carry staged URIs, not pixels: each reward decodes the images it scores.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterable, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from synpref.progress import progress
from synpref.schemas.config import RewardConfig
from synpref.schemas.records import Drop
from synpref.transforms.generation import error_line
from synpref.transforms.model_io import set_torch_threads
from synpref.transforms.rewards import Reward, create_reward
from synpref.transforms.staging import load_staged_image

DROPPED = "dropped"


class RewardModelHandler(ModelHandler[list, list, Reward]):
    """RunInference adapter for any registered reward."""

    def __init__(self, config: RewardConfig, *, total_images: Optional[int] = None, torch_threads: int = 1):
        super().__init__(model_copies=config.model_copies or None)
        self._config = config
        self._total = total_images
        self._threads = torch_threads
        create_reward(config.name, config.params)  # fail at build time on bad params, not on workers

    def load_model(self) -> Reward:
        set_torch_threads(self._threads)
        reward = create_reward(self._config.name, self._config.params)
        reward.load()
        return reward

    def run_inference(self, batch: Sequence[list], model: Reward, inference_args=None) -> Iterable:
        tracker = progress(f"score:{self._config.name}", self._total, "images")
        start = time.perf_counter()
        flat = [c for unit in batch for c in unit]
        images = [load_staged_image(c.image_uri) for c in flat]  # pixels live only for this call
        scores = model.score_batch(images, [c.prompt for c in flat])
        del images
        if len(scores) != len(flat):
            raise ValueError(f"reward {self._config.name} returned {len(scores)} scores for {len(flat)} images")
        Metrics.counter("synpref", "score_ms").inc(int(1000 * (time.perf_counter() - start)))
        tracker.update(len(flat))
        results, offset = [], 0
        for unit in batch:
            results.append(PredictionResult(unit, [float(s) for s in scores[offset:offset + len(unit)]],
                                            self._config.name))
            offset += len(unit)
        return results

    def batch_elements_kwargs(self):
        n = self._config.units_per_call
        return {"min_batch_size": n, "max_batch_size": n}

    def get_metrics_namespace(self) -> str:
        return f"synpref_score_{self._config.name}"


def _attach_scores(result: PredictionResult, reward_name: str) -> list:
    return [dataclasses.replace(c, scores={**c.scores, reward_name: s}) for c, s in zip(result.example, result.inference)]


def _failed_units(failure, reward_name: str):
    batch, exc = failure
    for unit in batch:
        for c in unit:
            yield Drop("candidate", "scoring_error", c.candidate_id, f"score:{reward_name}", error_line(exc))


class _CheckScores(beam.DoFn):
    """Drop candidates with a non-finite score (fp16 models produce NaN); key the rest by prompt."""

    def process(self, unit: list):
        for c in unit:
            bad = sorted(name for name, s in c.scores.items() if not math.isfinite(s))
            if bad:
                yield beam.pvalue.TaggedOutput(DROPPED, Drop("candidate", "nan_score", c.candidate_id,
                                                             f"score:{bad[0]}", "non-finite score from " + ", ".join(bad)))
            else:
                yield c.prompt_id, c


class ScoreCandidates(beam.PTransform):
    """units -> (prompt_id, Candidate with scores, no pixels); drops on the side."""

    def __init__(self, rewards: Sequence[RewardConfig], expected_images: Optional[int] = None,
                 torch_threads: int = 1):
        super().__init__()
        self.rewards, self.total, self.threads = list(rewards), expected_images, torch_threads

    def expand(self, units):
        dropped = []
        for r in self.rewards:
            score = RunInference(RewardModelHandler(r, total_images=self.total, torch_threads=self.threads))
            if r.accelerator:
                score = score.with_resource_hints(accelerator=r.accelerator)
            inference, failures = units | f"Score[{r.name}]" >> score.with_exception_handling()
            units = inference | f"Attach[{r.name}]" >> beam.Map(_attach_scores, r.name)
            dropped.append(failures.failed_inferences | f"ScoringErrors[{r.name}]" >> beam.FlatMap(_failed_units, r.name))
        checked = units | "CheckScores" >> beam.ParDo(_CheckScores()).with_outputs(DROPPED, main="scored")
        dropped.append(checked[DROPPED])
        return {"scored": checked.scored, "dropped": dropped | "ScoringDrops" >> beam.Flatten()}
