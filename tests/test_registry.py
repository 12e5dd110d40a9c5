"""The one registry every plug-in kind uses: names, duplicates refused, one-line errors naming the choices."""
import pytest

from synpref.core.registry import Registry
from synpref.training.families import FAMILIES
from synpref.transforms.aggregators import AGGREGATORS
from synpref.transforms.corpus_sources import SOURCES
from synpref.transforms.generators import GENERATORS
from synpref.transforms.rewards import REWARDS, register_reward


def test_register_lookup_and_errors():
    things = Registry("widget")

    @things.register("b", "b2")
    class B:
        pass

    @things.register("a", attribute=None)
    class A:
        pass

    assert things.names() == ["a", "b", "b2"] and things.lookup("b2") is B and B.name == "b"
    assert not hasattr(A, "name")
    with pytest.raises(ValueError, match=r"^unknown widget 'c'; available: \['a', 'b', 'b2'\]$"):
        things.lookup("c")
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        things.add("a", object())


def test_every_plugin_kind_is_a_registry_and_refuses_a_second_plugin_under_a_taken_name():
    for registry, name in ((REWARDS, "clip_score"), (GENERATORS, "diffusers"), (AGGREGATORS, "syn_pic"),
                           (SOURCES, "tar")):
        assert isinstance(registry, Registry) and name in registry.names()
    assert isinstance(FAMILIES, Registry)
    before = REWARDS["sharpness"]
    with pytest.raises(ValueError, match="reward 'sharpness' registered twice"):
        register_reward("sharpness")(type("Shadow", (), {}))
    assert REWARDS["sharpness"] is before
