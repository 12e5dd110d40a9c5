"""Generate K candidates per prompt per generator with Beam's RunInference.

One ``GenerationRequest`` (all K seeds of one prompt and one generator) is one
diffusers call, so batch composition, and with it every pixel, is the same on
every run and runner.
"""
from __future__ import annotations

import hashlib
import time
from typing import Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from synpref.progress import progress
from synpref.schemas.config import GeneratorConfig
from synpref.schemas.records import Candidate, Drop, GenerationRequest, PromptRecord
from synpref.transforms.generators import Generator, create_generator
from synpref.transforms.model_io import set_torch_threads
from synpref.transforms.staging import load_staged, stage_image, staged_uri, to_uint8

DROPPED = "dropped"


def derive_seed(global_seed: int, prompt_id: str, generator_id: str, index: int) -> int:
    """A 31-bit seed from (job seed, prompt_id, generator, candidate index): stable and independent."""
    h = hashlib.sha256(f"{global_seed}:{prompt_id}:{generator_id}:{index}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def make_request(prompt: PromptRecord, generator_id: str, k: int, global_seed: int) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, generator_id=generator_id, candidate_indices=tuple(range(k)),
        seeds=tuple(derive_seed(global_seed, prompt.prompt_id, generator_id, i) for i in range(k)))


class GeneratorModelHandler(ModelHandler[GenerationRequest, list, Generator]):
    """RunInference adapter for any registered generator: loads once per worker, one request per call."""

    def __init__(self, config: GeneratorConfig, *, total_images: Optional[int] = None, torch_threads: int = 1):
        super().__init__()
        self._config = config
        self._total = total_images
        self._threads = torch_threads

    def load_model(self) -> Generator:
        set_torch_threads(self._threads)
        generator = create_generator(self._config)
        generator.load()
        return generator

    def run_inference(self, batch: Sequence[GenerationRequest], model: Generator, inference_args=None) -> Iterable:
        tracker = progress("generate", self._total, "images")
        results = []
        for req in batch:
            start = time.perf_counter()
            images = model.generate([req.prompt.prompt] * len(req.seeds), req.seeds)
            Metrics.counter("synpref", "generate_ms").inc(int(1000 * (time.perf_counter() - start)))
            Metrics.counter("synpref", "images_generated").inc(len(images))
            tracker.update(len(images))
            results.append(PredictionResult(req, [(img, model.lineage(s)) for img, s in zip(images, req.seeds)],
                                            self._config.id))
        return results

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": 1}

    def get_metrics_namespace(self) -> str:
        return f"synpref_generate_{self._config.id}"


class _ReuseStaged(beam.DoFn):
    """Resume: a request whose images are all staged already skips generation."""

    def __init__(self, staging_dir: str):
        self.staging_dir = staging_dir

    def process(self, req: GenerationRequest):
        staged = []
        for i in range(len(req.seeds)):
            hit = load_staged(staged_uri(self.staging_dir, req.candidate_id(i)))
            if hit is None or hit[1].seed != req.seeds[i]:
                yield beam.pvalue.TaggedOutput("generate", req)
                return
            staged.append(hit)
        Metrics.counter("synpref", "images_reused").inc(len(staged))
        yield [Candidate(candidate_id=req.candidate_id(i), prompt_id=req.prompt.prompt_id, prompt=req.prompt.prompt,
                         lineage=lineage, pixels=pixels,
                         image_uri=staged_uri(self.staging_dir, req.candidate_id(i)))
               for i, (pixels, lineage) in enumerate(staged)]


class _StageGenerated(beam.DoFn):
    """Drop NaN images with a reason, stage the rest; emits one unit (list of candidates) per request."""

    def __init__(self, staging_dir: str):
        self.staging_dir = staging_dir

    def process(self, result: PredictionResult):
        req: GenerationRequest = result.example
        unit = []
        for i, (image, lineage) in enumerate(result.inference):
            cid = req.candidate_id(i)
            if not np.isfinite(image).all():
                yield beam.pvalue.TaggedOutput(DROPPED, Drop("candidate", "nan_image", cid, "generate",
                                                             f"generator {req.generator_id} produced NaN pixels"))
                continue
            pixels = to_uint8(image)
            uri = stage_image(self.staging_dir, cid, pixels, lineage)
            unit.append(Candidate(candidate_id=cid, prompt_id=req.prompt.prompt_id, prompt=req.prompt.prompt,
                                  lineage=lineage, pixels=pixels, image_uri=uri))
        if unit:
            yield unit


def _failed_requests(failure, generator_id: str):
    batch, exc = failure
    for req in batch:
        for i in range(len(req.seeds)):
            yield Drop("candidate", "generation_error", req.candidate_id(i), "generate",
                       f"{generator_id}: {type(exc).__name__}: {exc}"[:500])


class GenerateCandidates(beam.PTransform):
    """prompts -> units (lists of staged candidates with pixels) per (prompt, generator); drops on the side.

    Returns a dict ``{"units": ..., "dropped": ...}``.
    """

    def __init__(self, generators: Sequence[GeneratorConfig], k: int, seed: int, staging_dir: str,
                 expected_prompts: Optional[int] = None, torch_threads: int = 1):
        super().__init__()
        self.generators, self.k, self.seed, self.staging_dir = list(generators), k, seed, staging_dir
        self.threads = torch_threads
        self.total = None if expected_prompts is None else expected_prompts * k * len(self.generators)

    def expand(self, prompts):
        units, dropped = [], []
        for g in self.generators:
            requests = prompts | f"Requests[{g.id}]" >> beam.Map(make_request, g.id, self.k, self.seed)
            reuse = requests | f"ReuseStaged[{g.id}]" >> beam.ParDo(_ReuseStaged(self.staging_dir)).with_outputs(
                "generate", main="reused")
            inference, failures = (
                reuse.generate
                | f"Generate[{g.id}]" >> RunInference(GeneratorModelHandler(g, total_images=self.total, torch_threads=self.threads))
                .with_exception_handling())
            staged = inference | f"Stage[{g.id}]" >> beam.ParDo(_StageGenerated(self.staging_dir)).with_outputs(
                DROPPED, main="units")
            units += [reuse.reused, staged.units]
            dropped += [staged[DROPPED],
                        failures.failed_inferences | f"GenerationErrors[{g.id}]" >> beam.FlatMap(_failed_requests, g.id)]
        return {
            "units": units | "AllUnits" >> beam.Flatten(),
            "dropped": dropped | "GenerationDrops" >> beam.Flatten(),
        }
