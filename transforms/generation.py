"""Generate K candidates per prompt per generator with Beam's RunInference, staging each image at once.

One ``GenerationRequest`` (all K seeds of one prompt and one generator) is one
diffusers call by default, so batch composition, and with it every pixel, is the
same on every run and runner. Images are encoded and staged inside the model
handler: what leaves generation is ids, URIs and hashes, never pixels.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference

from ..schemas.config import GeneratorConfig
from ..core.errors import error_line
from ..schemas.records import Candidate, Drop, GenerationRequest, PromptRecord
from .generators import Generator, create_generator
from .inference import PluginModelHandler, Work
from .staging import (IMAGE_EXT, encode_image, encoding_tag, find_staged, generation_key,
                                        generator_fingerprint, stage_image, to_uint8)

DROPPED = "dropped"


def derive_seed(global_seed: int, prompt_id: str, generator_id: str, index: int) -> int:
    """A 31-bit seed from (job seed, prompt_id, generator, candidate index): stable and independent."""
    h = hashlib.sha256(f"{global_seed}:{prompt_id}:{generator_id}:{index}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def derive_paired_seed(global_seed: int, prompt_id: str, index: int) -> int:
    """A 31-bit seed from (job seed, prompt_id, index) only: every generator gets the same seeds for a
    prompt. ``synpref evaluate`` compares models on the same initial noise (a paired comparison: the
    seed's share of the score difference cancels); a build wants different noise per generator."""
    h = hashlib.sha256(f"{global_seed}:{prompt_id}:{index}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def make_request(prompt: PromptRecord, generator_id: str, k: int, global_seed: int,
                 generator_fp: str = "", paired: bool = False) -> GenerationRequest:
    """All K seeds of one (prompt, generator); ``paired``: seeds shared by every generator."""
    seeds = tuple(derive_paired_seed(global_seed, prompt.prompt_id, i) if paired
                  else derive_seed(global_seed, prompt.prompt_id, generator_id, i) for i in range(k))
    return GenerationRequest(prompt=prompt, generator_id=generator_id, candidate_indices=tuple(range(k)),
                             seeds=seeds, image_keys=tuple(generation_key(generator_fp, prompt.prompt, s) for s in seeds))


class GenerateAndStage(Work):
    """Generation as a ``Work``: one call makes the images of a batch of requests and stages each at once.

    Each result is a list with one entry per candidate: a staged ``Candidate``, or a ``Drop`` (NaN pixels).
    """

    stage, unit = "generate", "images"

    def __init__(self, config: GeneratorConfig, staging_dir: str, image_format: str = "png", jpeg_quality: int = 95):
        self.config, self.staging_dir = config, staging_dir
        self.image_format, self.jpeg_quality = image_format, jpeg_quality

    def load(self) -> Generator:
        generator = create_generator(self.config)
        generator.load()
        return generator

    def size(self, req: GenerationRequest) -> int:
        return len(req.seeds)

    def run(self, model: Generator, batch: Sequence[GenerationRequest]) -> list:
        prompts = [req.prompt.prompt for req in batch for _ in req.seeds]
        seeds = [s for req in batch for s in req.seeds]
        images = model.generate(prompts, seeds)  # batch_size requests = one call
        if len(images) != len(seeds):
            raise ValueError(f"generator {self.config.id} returned {len(images)} images for {len(seeds)} seeds")
        Metrics.counter("synpref", "images_generated").inc(len(images))
        it = iter(images)
        return [[self._stage(req, i, next(it), model) for i in range(len(req.seeds))] for req in batch]

    def _stage(self, req: GenerationRequest, i: int, image: np.ndarray, model: Generator):
        cid = req.candidate_id(i)
        if not np.isfinite(image).all():
            return Drop("candidate", "nan_image", cid, f"generate:{req.generator_id}",
                        f"generator {req.generator_id} produced NaN pixels (fp16 overflow?)")
        lineage = model.lineage(req.seeds[i])
        data = encode_image(to_uint8(image), self.image_format, self.jpeg_quality)
        uri, sha = stage_image(self.staging_dir, req.image_keys[i], data, lineage, IMAGE_EXT[self.image_format])
        return Candidate(candidate_id=cid, prompt_id=req.prompt.prompt_id, prompt=req.prompt.prompt,
                         lineage=lineage, image_uri=uri, image_sha256=sha)


def generator_handler(config: GeneratorConfig, staging_dir: str, *, total_images: Optional[int] = None,
                      torch_threads: int = 1, image_format: str = "png", jpeg_quality: int = 95) -> PluginModelHandler:
    """The RunInference handler for one generator (batch size and model copies from its config)."""
    return PluginModelHandler(GenerateAndStage(config, staging_dir, image_format, jpeg_quality), f"generate_{config.id}",
                              batch_size=config.batch_size, model_copies=config.model_copies,
                              torch_threads=torch_threads, total=total_images)


class _ReuseStaged(beam.DoFn):
    """Resume: a request whose images are all staged under their content keys skips generation."""

    def __init__(self, staging_dir: str, ext: str = "png"):
        self.staging_dir, self.ext = staging_dir, ext

    def process(self, req: GenerationRequest):
        staged = []
        for key in req.image_keys:
            hit = find_staged(self.staging_dir, key, self.ext)
            if hit is None:
                yield beam.pvalue.TaggedOutput("generate", req)
                return
            staged.append(hit)
        Metrics.counter("synpref", "images_reused").inc(len(staged))
        yield [Candidate(candidate_id=req.candidate_id(i), prompt_id=req.prompt.prompt_id, prompt=req.prompt.prompt,
                         lineage=lineage, image_uri=uri, image_sha256=sha)
               for i, (uri, sha, lineage) in enumerate(staged)]


def _split_outcomes(result: PredictionResult):
    """Staged candidates as one unit (the scoring granule); NaN images as drops."""
    unit = [c for c in result.inference if isinstance(c, Candidate)]
    for d in result.inference:
        if isinstance(d, Drop):
            yield beam.pvalue.TaggedOutput(DROPPED, d)
    if unit:
        yield unit


def _failed_requests(failure, generator_id: str):
    batch, exc = failure
    for req in batch:
        for i in range(len(req.seeds)):
            yield Drop("candidate", "generation_error", req.candidate_id(i), f"generate:{generator_id}",
                       error_line(exc))


class GenerateCandidates(beam.PTransform):
    """prompts -> units (lists of staged candidates, no pixels) per (prompt, generator); drops on the side.

    ``paired_seeds``: every generator gets the same K seeds for a prompt (``derive_paired_seed``), as
    ``synpref evaluate`` needs; the build (default) derives different seeds per generator. ``fingerprints``:
    generator id -> ``generator_fingerprint`` (with this encoding) when the caller has hashed the weights already.
    Returns a dict ``{"units": ..., "dropped": ...}``.
    """

    def __init__(self, generators: Sequence[GeneratorConfig], k: int, seed: int, staging_dir: str,
                 expected_prompts: Optional[int] = None, torch_threads: int = 1, image_format: str = "png",
                 jpeg_quality: int = 95, paired_seeds: bool = False, fingerprints: Optional[dict[str, str]] = None):
        super().__init__()
        self.generators, self.k, self.seed, self.staging_dir = list(generators), k, seed, staging_dir
        self.fingerprints = dict(fingerprints or {})  # generator id -> generator_fingerprint, if known already
        self.paired = paired_seeds
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.threads = torch_threads
        self.total = None if expected_prompts is None else expected_prompts * k * len(self.generators)

    def expand(self, prompts):
        units, dropped = [], []
        for g in self.generators:
            # on the launcher, once: model files are listed here, not per image. The encoding is part of the
            # key: a JPEG build never reuses a PNG staged for the same pixels, nor the reverse.
            fp = self.fingerprints.get(g.id) or generator_fingerprint(g, encoding_tag(self.image_format, self.jpeg_quality))
            requests = prompts | f"Requests[{g.id}]" >> beam.Map(make_request, g.id, self.k, self.seed, fp, self.paired)
            reuse = requests | f"ReuseStaged[{g.id}]" >> beam.ParDo(
                _ReuseStaged(self.staging_dir, IMAGE_EXT[self.image_format])).with_outputs("generate", main="reused")
            generate = RunInference(generator_handler(g, self.staging_dir, total_images=self.total,
                                                      torch_threads=self.threads, image_format=self.image_format,
                                                      jpeg_quality=self.jpeg_quality))
            if g.accelerator:
                generate = generate.with_resource_hints(accelerator=g.accelerator)
            inference, failures = reuse.generate | f"Generate[{g.id}]" >> generate.with_exception_handling()
            staged = inference | f"Stage[{g.id}]" >> beam.FlatMap(_split_outcomes).with_outputs(DROPPED, main="units")
            units += [reuse.reused, staged.units]
            dropped += [staged[DROPPED],
                        failures.failed_inferences | f"GenerationErrors[{g.id}]" >> beam.FlatMap(_failed_requests, g.id)]
        return {
            "units": units | "AllUnits" >> beam.Flatten(),
            "dropped": dropped | "GenerationDrops" >> beam.Flatten(),
        }
