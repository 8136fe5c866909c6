"""EpochSampler across ranks: disjoint equal shards of one order, and a position that survives a change of
world size."""

from __future__ import annotations

import pytest

from trainer.data import EpochSampler


def shards(length, world, start=0, epoch=0):
    out = []
    for rank in range(world):
        sampler = EpochSampler(length, seed=7, rank=rank, world_size=world)
        sampler.set_epoch(epoch, start=start)
        out.append(list(sampler))
        assert len(sampler) == len(out[-1])
    return out


def test_ranks_split_one_order_into_disjoint_equal_shards():
    (order,) = shards(103, 1)
    parts = shards(103, 4)
    assert {len(p) for p in parts} == {25}  # 103 // 4: the last three are dropped so ranks stay in step
    assert sorted(sum(parts, [])) == sorted(order[:100])
    assert [parts[i % 4][i // 4] for i in range(100)] == order[:100]  # rank r takes every 4th, from r
    assert shards(103, 4, epoch=1) != parts  # a new order each epoch


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 4)])
def test_a_new_world_size_continues_the_order_where_the_old_one_stopped(old_world, new_world):
    (order,) = shards(96, 1)
    seen = 24  # examples done by all old ranks together
    parts = shards(96, new_world, start=seen)
    interleaved = [parts[i % new_world][i // new_world] for i in range(sum(map(len, parts)))]
    assert interleaved == order[seen:]


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        EpochSampler(10, seed=0, rank=2, world_size=2)
