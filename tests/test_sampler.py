"""ResumableSampler: a seeded order per epoch, cut to whole global batches, resumable part-way."""
import pytest
import torch

from wrapssl.sampler import ResumableSampler


def naive_epoch(n: int, batch: int, seed: int, epoch: int) -> list[int]:
    """The whole epoch's order, written out: the seeded permutation cut to full global batches."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    order = torch.randperm(n, generator=g).tolist()
    return order[:n // batch * batch]


@pytest.mark.parametrize("n,batch,seed", [(10, 3, 0), (48, 8, 5), (7, 7, 1)])
def test_epochs_are_seeded_permutations_in_whole_batches(n, batch, seed):
    sampler = ResumableSampler(n, batch, seed)
    for epoch in range(3):
        sampler.position(epoch, 0)
        got = list(sampler)
        assert got == naive_epoch(n, batch, seed, epoch) and len(sampler) == len(got)
        assert len(set(got)) == len(got) and len(got) % batch == 0
    sampler.position(0, 0)
    first = list(sampler)
    sampler.position(1, 0)
    assert list(sampler) != first  # a new order each epoch


@pytest.mark.parametrize("skip", [0, 4, 8, 40, 48])
def test_resuming_part_way_continues_the_same_order(skip):
    whole = naive_epoch(50, 4, 3, 2)
    sampler = ResumableSampler(50, 4, 3)
    sampler.position(2, skip)
    rest = list(sampler)
    assert rest == whole[skip:skip + (50 - skip) // 4 * 4]
    assert len(sampler) == len(rest)
