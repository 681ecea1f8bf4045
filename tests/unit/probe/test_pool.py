"""probe.pool: leave-one-out pools topped up with the built-in facts only where the file is too small."""

from __future__ import annotations

import random

import pytest

from probe.facts import Fact, load_facts
from probe.pool import (BUILTIN_PREFIX, EXTRA_BELOW, FILE, TOPPED_UP, PoolUse, draw, extra_facts, is_builtin,
                        pool_summary, top_up)


def test_top_up_adds_the_built_in_items_only_below_the_need():
    assert top_up([1, 2, 3], [7, 8], 3) == ([1, 2, 3], PoolUse(FILE, 3))
    assert top_up([1, 2], [7, 8], 3) == ([1, 2, 7, 8], PoolUse(TOPPED_UP, 4))  # file first
    assert top_up([1], [], 3) == ([1], PoolUse(FILE, 1))  # nothing to top up with


def test_draw_takes_every_file_item_before_any_built_in_one():
    picked, use = draw(list(range(5)), list(range(100, 200)), 8, random.Random(0))
    assert picked[:5] == list(range(5)) and len(picked) == 8 and all(x >= 100 for x in picked[5:])
    assert use == PoolUse(TOPPED_UP, 105)
    # a file with enough: the same seeded sample as before pools existed (rng.sample of the file)
    picked, use = draw(list(range(20)), list(range(100, 200)), 8, random.Random(0))
    assert picked == random.Random(0).sample(list(range(20)), 8) and use == PoolUse(FILE, 20)


def test_extra_facts_are_the_built_in_facts_not_in_the_file_with_prefixed_ids():
    builtin = load_facts(None)
    mine = [Fact("a", builtin[0].prompt, builtin[0].answer), Fact("b", "The sky is", "blue")]
    extra = extra_facts(mine)
    assert len(extra) == len(builtin) - 1 == 198
    assert all(is_builtin(g) and g.id.startswith(BUILTIN_PREFIX) for g in extra)
    assert not any(g.prompt == builtin[0].prompt and g.answer == builtin[0].answer for g in extra)
    assert not is_builtin(mine[0])
    assert extra_facts(builtin) == []  # the built-in set itself: nothing to add
    big = [Fact(f"f{i}", f"Prompt {i} is", "x") for i in range(EXTRA_BELOW)]
    assert extra_facts(big) == [] and len(extra_facts(big[:-1])) == len(builtin)


def test_pool_summary_counts_sources_and_sizes_per_metric_and_attack():
    from probe.results import AttackOutcome

    class U:
        def __init__(self, pools, pool):
            self.pools = pools
            self.outcomes = {"relearning": {"pre": AttackOutcome(False, 20, details={"pool": pool}), "post": None}}

    units = [U({"random": {"source": FILE, "size": 29}}, {"source": FILE, "size": 29}),
             U({"random": {"source": TOPPED_UP, "size": 199}}, {"source": TOPPED_UP, "size": 120})]
    s = pool_summary(units)
    assert s["metrics"]["random"] == {FILE: 1, TOPPED_UP: 1, "size_min": 29, "size_max": 199}
    assert s["attacks"]["relearning"] == {FILE: 1, TOPPED_UP: 1, "size_min": 29, "size_max": 120}


@pytest.mark.parametrize("source,size", [(FILE, 3), (TOPPED_UP, 0)])
def test_pool_use_round_trips_through_json(source, size):
    u = PoolUse(source, size)
    assert PoolUse.from_json(u.to_json()) == u and PoolUse.from_json(None) is None
