"""Buckets, crops, captions and the data order: what each micro-batch holds, epoch after epoch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from modules.config.data_schema import ConceptConfig
from modules.data.buckets import make_buckets, nearest_bucket, place
from modules.data.captions import augment, caption_variants, with_trigger
from modules.training.data_order import DataOrder, Group


def test_buckets_keep_the_pixel_area_in_family_multiples() -> None:
    for step in (64, 16):  # SDXL, Flux
        buckets = make_buckets(1024, step=step, max_aspect=4.0, enabled=True)
        for width, height in buckets:
            assert width % step == 0 and height % step == 0
            assert 0.9 * 1024**2 <= width * height <= 1024**2
            assert max(width, height) / min(width, height) <= 4.0
            assert (height, width) in buckets
    sdxl = make_buckets(1024, step=64, max_aspect=4.0, enabled=True)
    assert {(1024, 1024), (832, 1216), (1216, 832), (896, 1152)} <= set(sdxl)
    assert make_buckets(1024, step=64, max_aspect=4.0, enabled=False) == [(1024, 1024)]


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio() -> None:
    buckets = make_buckets(1024, step=64, max_aspect=4.0, enabled=True)
    assert nearest_bucket((3000, 2000), buckets) == (1216, 832)  # 3:2 landscape
    assert nearest_bucket((2000, 3000), buckets) == (832, 1216)
    assert nearest_bucket((500, 500), buckets) == (1024, 1024)
    assert nearest_bucket((8000, 500), buckets) == (2048, 512)  # beyond 4:1: the widest


def test_crop_offsets_original_size_and_flip() -> None:
    center = place((300, 200), (192, 64), random_crop=False, flip=False, draws=(0.0, 0.0))
    assert center.resized == (192, 128) and (center.top, center.left) == (32, 0)
    assert center.crop_top_left == (32, 0) and center.original == (300, 200)
    tops = {
        place((300, 200), (192, 64), random_crop=True, flip=False, draws=(d, d)).top
        for d in np.linspace(0, 0.999, 50)
    }
    assert min(tops) == 0 and max(tops) == 64
    wide = place((400, 100), (128, 128), random_crop=False, flip=True, draws=(0.0, 0.0))
    assert wide.resized == (512, 128) and wide.left == 192
    right = place((400, 100), (128, 128), random_crop=True, flip=True, draws=(0.999, 0))
    assert right.left == 384 and right.crop_top_left == (0, 0)  # mirrored: now on the left


def _order(groups, **kw) -> DataOrder:
    settings = {"batch_size": 2, "seed": 3, "rank": 0, "world": 1} | kw
    return DataOrder(groups, **settings)


GROUPS = [
    Group(bucket=(64, 64), members=(0, 1, 2), per_epoch=3),
    Group(bucket=(128, 64), members=(3, 4), per_epoch=4),  # repeats 2
    Group(bucket=(64, 64), members=(5,), per_epoch=1),  # a second concept in the same bucket
]
BUCKET_OF = {0: (64, 64), 1: (64, 64), 2: (64, 64), 3: (128, 64), 4: (128, 64), 5: (64, 64)}


def test_batches_come_from_one_bucket_and_no_image_is_lost() -> None:
    order = _order(GROUPS)
    assert order.micro_per_epoch == 4  # 4 images in (64, 64) and 4 draws in (128, 64)
    for epoch in range(3):
        seen = Counter()
        for position in range(epoch * 4, epoch * 4 + 4):
            got_epoch, draws = order.micro_batch(position)
            assert got_epoch == epoch
            assert len({BUCKET_OF[d.index] for d in draws}) == 1
            seen.update(d.index for d in draws)
        assert seen == {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 1}
    first = [d.index for p in range(4) for d in order.micro_batch(p)[1]]
    second = [d.index for p in range(4, 8) for d in order.micro_batch(p)[1]]
    assert first != second, "each epoch is reshuffled"


def test_partial_batches_are_kept_unless_drop_last() -> None:
    groups = [Group((64, 64), (0, 1, 2), 3), Group((128, 64), (3,), 1)]
    assert [len(order_batch) for order_batch in _order(groups).epoch_batches(0)].count(1) == 2
    dropped = _order(groups, drop_last=True)
    assert dropped.micro_per_epoch == 1 and dropped.epoch_batches(0)[0] in (
        [0, 1],
        [0, 2],
        [1, 2],
        [1, 0],
        [2, 0],
        [2, 1],
    )


def test_order_is_a_pure_function_of_seed_and_position() -> None:
    """What resume relies on: a fresh DataOrder gives the same micro-batch for a position."""
    a, b = _order(GROUPS), _order(GROUPS)
    for position in (9, 0, 5, 9, 13):
        assert a.micro_batch(position) == b.micro_batch(position)
    assert _order(GROUPS, seed=4).epoch_batches(0) != a.epoch_batches(0)


def test_ranks_get_equal_shares_covering_the_epoch() -> None:
    whole = _order(GROUPS, batch_size=1)
    ranks = [_order(GROUPS, batch_size=1, rank=r, world=3) for r in range(3)]
    assert {r.micro_per_epoch for r in ranks} == {3}  # 9 draws: 3 each
    shared = Counter(d.index for r in ranks for p in range(3) for d in r.micro_batch(p)[1])
    assert shared == Counter(d.index for p in range(9) for d in whole.micro_batch(p)[1])
    odd = _order(GROUPS, batch_size=3, world=3)  # 4 batches, padded to 6 by repeating
    batches = odd.epoch_batches(0)
    assert odd.micro_per_epoch == 2 and len(batches) == 6 and batches[4:] == batches[:2]


def test_noise_is_seeded_by_slot_so_ranks_differ_and_match_one_process() -> None:
    """Rank r's micro-batch k is the single process's micro-batch 2k + r: same data, same noise;
    two ranks never share their noise."""
    whole = _order(GROUPS, batch_size=1)
    ranks = [_order(GROUPS, batch_size=1, rank=r, world=2) for r in range(2)]
    for k in range(9):  # across an epoch boundary
        for rank, order in enumerate(ranks):
            assert order.micro_batch(k) == whole.micro_batch(2 * k + rank)
            assert order.noise_seed(k) == whole.noise_seed(2 * k + rank)
        assert ranks[0].noise_seed(k) != ranks[1].noise_seed(k)
    assert len({whole.noise_seed(p) for p in range(40)}) == 40


def test_fractional_repeats_draw_a_different_subset_each_epoch() -> None:
    order = _order([Group((64, 64), tuple(range(10)), 5)], batch_size=5)
    subsets = [frozenset(order.epoch_batches(e)[0]) for e in range(6)]
    assert all(len(s) == 5 for s in subsets) and len(set(subsets)) > 1


# -- captions -----------------------------------------------------------------------------------


def concept(**kw: object) -> ConceptConfig:
    return ConceptConfig(path="x", **kw)


def test_trigger_word_goes_first_once() -> None:
    c = concept(trigger_word="sks")
    assert with_trigger("a dog, grass", c) == "sks, a dog, grass"
    assert with_trigger("sks, a dog", c) == "sks, a dog"
    assert with_trigger("", c) == "sks"


def test_tag_shuffle_keeps_the_trigger_and_leading_tags() -> None:
    c = concept(trigger_word="sks", shuffle_tags=True, keep_tags=1)
    caption = "portrait, red, blue, green, yellow, tree"
    seen = set()
    for seed in range(30):
        tags = augment(caption, c, np.random.default_rng(seed)).split(", ")
        assert tags[:2] == ["sks", "portrait"]
        assert sorted(tags[2:]) == sorted(caption.split(", ")[1:])
        seen.add(tuple(tags))
    assert len(seen) > 10
    assert augment(caption, c, np.random.default_rng(5)) == augment(
        caption, c, np.random.default_rng(5)
    )


@pytest.mark.parametrize(("field", "rate"), [("caption_dropout", 0.3), ("tag_dropout", 0.5)])
def test_dropout_rates(field: str, rate: float) -> None:
    c = concept(trigger_word="sks", keep_tags=1, **{field: rate})
    results = [augment("kept, a, b, c, d", c, np.random.default_rng(s)) for s in range(2000)]
    if field == "caption_dropout":
        assert abs(results.count("") / 2000 - rate) < 0.04
        assert set(results) == {"", "sks, kept, a, b, c, d"}
        assert caption_variants("kept, a", c) == ["sks, kept, a", ""]
    else:
        assert all(r.startswith("sks, kept") for r in results)
        dropped = sum(4 - (len(r.split(", ")) - 2) for r in results) / (4 * 2000)
        assert abs(dropped - rate) < 0.03
