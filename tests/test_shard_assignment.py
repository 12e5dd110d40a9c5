"""The build's shard rule (position in the sorted prompt ids / samples_per_shard) computed without a list of all ids."""
import hashlib

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from synpref.transforms.writing import AssignShards, order_bucket


def ids() -> list[str]:
    hexes = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(3000)]  # as prompts.prompt_id_of
    return hexes + ["", "a", "ab", "abc", "abcd", "abcd\0", "abcde", "\u00e9", "\u00e9t\u00e9", "\U0001F600x", "zzzz"]


@pytest.mark.parametrize("per_shard", [1, 7, 1000, 5000])
def test_positions_equal_the_sorted_list_rule(per_shard):
    keys = ids()
    expected = [(i // per_shard, k) for i, k in enumerate(sorted(keys))]  # the rule, with the whole list
    with beam.Pipeline() as p:
        got = p | beam.Create(list(reversed(keys))) | AssignShards(per_shard, lambda k: k)
        assert_that(got, equal_to(expected))


def test_buckets_preserve_order_and_spread_hex_ids():
    keys = sorted(ids())
    buckets = [order_bucket(k) for k in keys]
    assert buckets == sorted(buckets)
    per_bucket: dict[int, int] = {}
    for k in ids()[:3000]:
        per_bucket[order_bucket(k)] = per_bucket.get(order_bucket(k), 0) + 1
    assert max(per_bucket.values()) <= 5  # 3000 hex ids over 16^4 buckets: a group holds a few, not all
