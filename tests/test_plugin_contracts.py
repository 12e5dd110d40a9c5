"""Contracts every registered plug-in keeps, parametrised over the registries themselves (as open_clip's
tests run over ``list_models()``): a reward, generator, aggregator, corpus source, model family, data
format or exporter added tomorrow is tested the day it is added, with no test edited.

Expected values come from the contract itself (a permuted input gives permuted labels, a dominating
candidate ranks first, the same seed gives the same pixels), never from the code under test.
"""
import json

import diffusers
import numpy as np
import pytest
from PIL import Image

from synpref.core.registry import Registry
from synpref.formats.export import EXPORTERS
from synpref.schemas.config import GeneratorConfig
from synpref.training.data import READERS
from synpref.training.families import FAMILIES, ModelFamily
from synpref.transforms.aggregators import AGGREGATORS, dataset_stats
from synpref.transforms.corpus_sources import SOURCES, CorpusSource
from synpref.transforms.embedders import EMBEDDERS, create_embedder
from synpref.transforms.generators import GENERATORS, Generator, create_generator
from synpref.transforms.ranking import label_table
from synpref.transforms.rewards import REWARDS, Reward, create_reward

def builtin(registry) -> list[str]:
    """The names synpref itself registers (test modules register throwaway plug-ins in the same registries)."""
    def module(item):
        return getattr(getattr(item, "fn", item), "__module__", "")
    return [n for n in registry.names() if module(registry[n]).startswith("synpref.")]


ALL = {"reward": REWARDS, "generator type": GENERATORS, "aggregator": AGGREGATORS, "corpus source": SOURCES,
       "embedder": EMBEDDERS, "model family": FAMILIES, "data format": READERS, "export format": EXPORTERS}


@pytest.mark.parametrize("kind", sorted(ALL))
def test_every_registry_is_filled_by_importing_its_package(kind):
    registry = ALL[kind]
    assert isinstance(registry, Registry) and registry.kind == kind and registry.names()
    with pytest.raises(ValueError, match=f"unknown {kind} 'no-such-plugin'; available: "):
        registry.lookup("no-such-plugin")


# ---- aggregators: labels that depend on the scores, not on the order candidates arrive in
REWARD_NAMES = ["r0", "r1", "r2"]


def _tables(seed=0, n_tables=6, k=4):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(k, len(REWARD_NAMES))) for _ in range(n_tables)]


def _phi(name, table, stats):
    phi, _ = label_table(table, REWARD_NAMES, name, stats=stats)
    return np.asarray(phi, dtype=np.float64)


@pytest.mark.parametrize("name", builtin(AGGREGATORS))
def test_aggregator_labels_are_finite_permutation_equivariant_and_rank_a_dominating_candidate_first(name):
    tables = _tables()
    need = AGGREGATORS.lookup(name).needs_stats({})
    stats = dataset_stats(tables, REWARD_NAMES, need) if need else None
    perm = np.array([2, 0, 3, 1])
    for table in tables:
        phi = _phi(name, table, stats)
        assert phi.shape == (4,) and np.isfinite(phi).all()
        np.testing.assert_allclose(_phi(name, table[perm], stats), phi[perm], rtol=0, atol=1e-12)
        best = table.max(axis=0) + 1.0  # strictly above every candidate on every reward
        phi_plus = _phi(name, np.vstack([table, best]), stats)
        assert phi_plus[-1] > phi_plus[:-1].max(), (name, phi_plus)


# ---- rewards: the interface, and for rewards that need no weights the scoring contract itself
def _images():
    rng = np.random.default_rng(1)
    return [Image.new("RGB", (64, 48), (120, 30, 200)),
            Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)),
            Image.fromarray(np.tile(np.linspace(0, 255, 72, dtype=np.uint8), (72, 1))).convert("RGB")]


PROMPTS = ["a purple square", "static noise", "a grey gradient"]


@pytest.mark.parametrize("name", builtin(REWARDS))
def test_reward_is_registered_under_its_name_and_documents_itself(name):
    cls = REWARDS.lookup(name)
    assert issubclass(cls, Reward) and cls.name == name
    assert (cls.__doc__ or "").strip(), f"reward {name} has no docstring"


def _weight_free(name):
    try:
        reward = create_reward(name)
    except (TypeError, ValueError):  # needs a checkpoint: covered by its own test module with a tiny model
        return None
    return reward if not reward.files() else None


@pytest.mark.parametrize("name", [n for n in builtin(REWARDS) if _weight_free(n) is not None])
def test_weight_free_reward_scores_are_finite_repeatable_and_independent_of_the_batch(name):
    reward = _weight_free(name)
    reward.load()
    together = reward.score_batch(_images(), PROMPTS)  # NaN is allowed (the pipeline drops it with a reason)
    assert len(together) == 3 and all(isinstance(s, float) for s in together) and np.isfinite(together[1:]).all()
    np.testing.assert_array_equal(reward.score_batch(_images(), PROMPTS), together)
    alone = [reward.score_batch([img], [p])[0] for img, p in zip(_images(), PROMPTS)]
    np.testing.assert_allclose(alone, together, rtol=1e-6, equal_nan=True)
    described = reward.describe()
    assert described["name"] == name
    json.dumps(described, allow_nan=False)


# ---- generators: same seed, same pixels; another seed, other pixels
def _generator_config(name, demo_models):
    """A tiny config per registered generator type; a new type fails here until it is given one."""
    configs = {
        "procedural": dict(model="synpref/procedural"),
        "diffusers": dict(model=demo_models["tiny-sd-a"], num_inference_steps=2, guidance_scale=5.0),
    }
    assert name in configs, f"generator type {name!r} has no tiny config in the contract test"
    return GeneratorConfig(id=f"contract-{name}", type=name, height=64, width=64, device="cpu", **configs[name])


@pytest.mark.parametrize("name", builtin(GENERATORS))
def test_generator_is_deterministic_per_seed(name, demo_models):
    gen = create_generator(_generator_config(name, demo_models))
    assert isinstance(gen, Generator)
    gen.load()
    a = gen.generate(["a red cube", "a red cube"], [7, 8])
    b = gen.generate(["a red cube", "a red cube"], [7, 8])  # the same call: batch composition changes last bits
    assert len(a) == 2 and all(np.asarray(img).shape[:2] == (64, 64) for img in a)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))


# ---- the rest: registered under names their users write, with the interface they are called through
@pytest.mark.parametrize("name", builtin(FAMILIES))
def test_model_family_is_registered_under_a_diffusers_pipeline_class(name):
    assert issubclass(FAMILIES.lookup(name), ModelFamily)
    assert hasattr(diffusers, name), f"{name} is not a diffusers pipeline class: model_index.json never names it"


@pytest.mark.parametrize("name", builtin(SOURCES))
def test_corpus_source_implements_the_source_interface(name):
    cls = SOURCES.lookup(name)
    assert issubclass(cls, CorpusSource) and (cls.__doc__ or "").strip()
    for method in ("iter_samples", "open_images"):
        assert getattr(cls, method) is not getattr(CorpusSource, method), f"{name} does not implement {method}"


@pytest.mark.parametrize("name", builtin(READERS))
def test_data_format_reader_names_its_file_extension(name):
    cls = READERS.lookup(name)
    assert cls.extension in ("tar", "parquet") and callable(getattr(cls, "__iter__", None))


@pytest.mark.parametrize("name", builtin(EXPORTERS))
def test_exporter_is_registered_under_its_name(name):
    cls = EXPORTERS.lookup(name)
    assert cls.name == name and callable(getattr(cls, "run", None)) and (cls.__doc__ or "").strip()


# ---- embedders: unit (or zero) rows, one per image, independent of the batch they came in
@pytest.mark.parametrize("name", builtin(EMBEDDERS))
def test_embedder_rows_are_unit_vectors_one_per_image_whatever_the_batch(name, tmp_path):
    params = {}
    if name == "open_clip":
        from synpref.demo.tiny_models import save_tiny_open_clip

        params = save_tiny_open_clip(tmp_path / "clip")
    embedder = create_embedder(name, params)
    info = embedder.describe()
    assert json.loads(json.dumps(info)) == info and info["name"] == name
    embedder.load()
    images = _images()
    x = embedder.embed(images)
    assert x.dtype == np.float32 and x.ndim == 2 and len(x) == len(images) and np.isfinite(x).all()
    norms = np.linalg.norm(x, axis=1)  # 0 only where an embedder sees nothing (thumbnail: a flat image)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0)) and np.abs(norms[1] - 1) < 1e-5, norms
    np.testing.assert_allclose(embedder.embed(images[::-1]), x[::-1], atol=1e-5)
    np.testing.assert_allclose(embedder.embed(images[1:2])[0], x[1], atol=1e-5)
