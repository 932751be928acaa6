"""mixture: a transfer set drawn from several sources with exact per-epoch shares, with or without labels."""

import math
from fractions import Fraction

import pytest
import torch

from kdforge.data import Skipped
from kdforge.data.mixture import MixtureDataset, apportion, interleave
from kdforge.errors import DataError, KdforgeError, RecipeError
from kdforge.plugins import create
from kdforge.recipe import load_recipe

from cli_helpers import TINY


def procedural(num_train=20, num_classes=4, **extra):
    return {"plugin": "procedural", "num_train": num_train, "num_val": 0, "image_size": 8, "num_classes": num_classes,
            **extra}


def mixture(sources, length=0):
    return create("data_sources", {"plugin": "mixture", "sources": sources, "length": length}, "data")


def test_apportion_is_exact_and_splits_by_largest_remainder():
    assert apportion(10, [1, 2, 1]) == [3, 5, 2]  # quotas 2.5, 5, 2.5: the one unit left goes to the first tie
    assert apportion(7, [1, 1]) == [4, 3] and apportion(0, [1, 3]) == [0, 0]
    assert apportion(100, [0.1, 0.2, 0.7]) == [10, 20, 70]  # exact fractions: no float rounding loses a unit
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        weights = (torch.rand(int(torch.randint(1, 6, (), generator=g)), generator=g) + 0.01).tolist()
        total = int(torch.randint(0, 1000, (), generator=g))
        shares = apportion(total, weights)
        quotas = [total * Fraction(w) / sum(map(Fraction, weights)) for w in weights]
        assert sum(shares) == total
        assert all(math.floor(q) <= s <= math.floor(q) + 1 for s, q in zip(shares, quotas))
        # largest remainder: a source rounded down never has a larger fraction than one rounded up
        up = [q - math.floor(q) for s, q in zip(shares, quotas) if s > math.floor(q)]
        down = [q - math.floor(q) for s, q in zip(shares, quotas) if s == math.floor(q)]
        assert not up or not down or min(up) >= max(down)


def test_interleave_spreads_each_source_over_the_epoch():
    owners = interleave([50, 25, 25])
    assert torch.bincount(owners.long()).tolist() == [50, 25, 25]
    for prefix in (4, 20, 60):  # every prefix holds each source in about its proportion
        counts = torch.bincount(owners[:prefix].long(), minlength=3).tolist()
        assert abs(counts[0] - prefix / 2) <= 1 and abs(counts[1] - prefix / 4) <= 1
    assert interleave([0, 3]).tolist() == [1, 1, 1] and len(interleave([0, 0])) == 0


def test_an_epoch_holds_each_source_exactly_in_proportion_to_its_frequency():
    src = mixture({"real": procedural(), "synthetic": procedural(num_train=60, seed=1, labels=False, frequency=2.0),
                   "third": procedural(num_train=5, seed=2, frequency=0.5)}, length=35)
    ds = src.build("train", None)
    assert isinstance(ds, MixtureDataset) and len(ds) == 35 and ds.counts == [10, 20, 5]
    sources = [ds.locate(i)[0] for i in range(len(ds))]
    assert [sources.count(s) for s in range(3)] == [10, 20, 5]
    # the unlabelled source's items are exactly the positions it owns
    labels = []
    for i in range(len(ds)):
        torch.manual_seed(i)
        labels.append(ds[i]["label"])
    assert [i for i, y in enumerate(labels) if y == -1] == [i for i, s in enumerate(sources) if s == 1]


def test_length_zero_is_the_sum_of_the_sources_sizes_and_equal_frequencies_split_it_evenly():
    ds = mixture({"a": procedural(num_train=10), "b": procedural(num_train=30, seed=1)}).build("train", None)
    assert len(ds) == 40 and ds.counts == [20, 20]  # equal frequency, whatever the sizes (papers/002)


def test_items_are_drawn_uniformly_from_their_source():
    src = mixture({"a": procedural(num_train=20), "b": procedural(num_train=5, seed=1)}, length=2000)
    ds = src.build("train", None)
    drawn = {0: [], 1: []}
    for i in range(len(ds)):
        torch.manual_seed(1000 + i)  # as the engine seeds each item
        source, inner = ds.locate(i)
        drawn[source].append(inner)
    for source, size in ((0, 20), (1, 5)):
        counts = torch.bincount(torch.tensor(drawn[source]), minlength=size).double()
        assert len(counts) == size and counts.min() > 0
        expected = len(drawn[source]) / size
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        # chi-square with size - 1 degrees of freedom: mean size - 1, sd sqrt(2 (size - 1)); 6 sd is p < 1e-5
        assert chi2 < (size - 1) + 6 * math.sqrt(2 * (size - 1)), (source, counts.tolist())


def test_items_are_the_drawn_source_items_and_reproducible_under_a_fixed_seed():
    src = mixture({"a": procedural(), "b": procedural(num_train=30, seed=1)})
    ds = src.build("train", None)
    inner = [s.build("train", None) for s in src.sources]
    for i in (0, 7, 33):
        torch.manual_seed(i)
        source, j = ds.locate(i)
        torch.manual_seed(i)
        item = ds[i]
        torch.manual_seed(i)
        again = ds[i]
        assert item["index"] == i and item["label"] == inner[source][j]["label"]
        assert torch.equal(item["image"], inner[source][j]["image"]) and torch.equal(item["image"], again["image"])
    torch.manual_seed(0)
    first = [ds[i]["image"] for i in range(40)]
    assert len({bytes(x.flatten().numpy()) for x in first}) > 25  # different positions draw different items


def test_random_transforms_replay_with_the_seed():
    flip_or_not = lambda x: x.flip(-1) if torch.rand(()) < 0.5 else x  # noqa: E731
    ds = mixture({"a": procedural()}).build("train", flip_or_not)
    out = []
    for _ in range(2):
        torch.manual_seed(5)
        out.append(torch.stack([ds[i]["image"] for i in range(10)]))
    assert torch.equal(out[0], out[1])


def test_labels_and_num_classes():
    kept = mixture({"a": procedural(), "b": procedural(seed=1)})
    assert kept.num_classes == 4
    torch.manual_seed(0)
    assert all(0 <= kept.build("train", None)[i]["label"] < 4 for i in range(10))
    dropped = mixture({"a": procedural(labels=False), "b": procedural(seed=1, labels=False)})
    assert dropped.num_classes is None
    assert all(dropped.build("train", None)[i]["label"] == -1 for i in range(10))
    # only sources that keep their labels must agree on the classes
    assert mixture({"a": procedural(), "b": procedural(num_classes=3, labels=False)}).num_classes == 4
    with pytest.raises(RecipeError) as exc:
        mixture({"a": procedural(), "b": procedural(num_classes=3)})
    msg = str(exc.value)
    assert "data.sources.a has 4 classes but data.sources.b has 3" in msg and "data.sources.b.labels = false" in msg


def test_a_source_without_labels_counts_as_unlabelled(tmp_path, image_writer):
    for i in range(3):
        image_writer(tmp_path / "flat" / f"{i}.png", i)
    src = mixture({"a": procedural(), "extra": {"plugin": "image_folder", "root": str(tmp_path / "flat")}})
    assert src.num_classes == 4


def test_only_the_train_split_exists():
    src = mixture({"a": procedural()})
    assert src.splits == ("train",)
    with pytest.raises(DataError, match=r"train split only, no 'val' split.*\[eval.data\]"):
        src.build("val", None)


def test_unreadable_items_pass_through(imagenet_tree, corrupt_writer):
    broken = corrupt_writer(imagenet_tree / "train" / "ant", imagenet_tree / "train" / "bee" / "bee_1.png")
    ds = mixture({"files": {"plugin": "image_folder", "root": str(imagenet_tree)}}, length=60).build("train", None)
    items = []
    for i in range(len(ds)):
        torch.manual_seed(i)
        items.append(ds[i])
    skipped = [it for it in items if isinstance(it, Skipped)]
    assert skipped and {s.path for s in skipped} <= set(broken.values())
    assert all(it["index"] == i for i, it in enumerate(items) if not isinstance(it, Skipped))


def test_an_empty_source_with_a_share_is_refused(tmp_path):
    with pytest.raises(DataError, match="data.sources.none has no images in its train split"):
        mixture({"a": procedural(), "none": procedural(num_train=0)}).build("train", None)


@pytest.mark.parametrize("sources, message", [
    ("{a={plugin='procedural', num_trian=5}}",
     "unknown key 'num_trian' in [data.sources.a]: did you mean 'num_train'?"),
    ("{a={plugin='procedural', frequncy=2}}", "unknown key 'frequncy' in [data.sources.a]: did you mean 'frequency'?"),
    ("{a={plugin='procedural', frequency=0}}", "data.sources.a.frequency = 0.0 is out of range: it must be > 0"),
    ("{a={plugin='procedural', labels='no'}}", "data.sources.a.labels must be true or false, got 'no'"),
    ("{a={num_train=5}}", "[data.sources.a] needs `plugin = \"...\"` naming one of"),
    ("{a=3}", "data.sources.a must be a table, got int 3"),
    ("{a={plugin='procedural'}, b={plugin='digitz'}}", "unknown data source 'digitz' in [data.sources.b]"),
    ("{}", "sources must name at least one source"),
])
def test_nested_config_errors_name_the_key_when_the_recipe_is_resolved(sources, message):
    with pytest.raises(KdforgeError) as exc:
        load_recipe(TINY, overrides=[f"data={{plugin='mixture', sources={sources}}}"])
    assert message in str(exc.value)


def test_an_epoch_through_the_engines_sampler_is_the_same_with_any_number_of_workers():
    from kdforge.data import collate
    from kdforge.engine.trainer import EpochSampler, SeededItems

    src = mixture({"a": procedural(), "b": procedural(num_train=30, seed=1, labels=False)}, length=32)
    items = SeededItems(src.build("train", lambda x: x.flip(-1) if torch.rand(()) < 0.5 else x), seed=3)

    def epoch(workers):
        sampler = EpochSampler(len(items), seed=3)
        sampler.set_position(1)
        loader = torch.utils.data.DataLoader(items, batch_size=8, sampler=sampler, collate_fn=collate,
                                             num_workers=workers)
        batches = list(loader)
        return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])

    (images, labels), (images2, labels2) = epoch(0), epoch(2)
    assert torch.equal(images, images2) and torch.equal(labels, labels2)
    assert int((labels == -1).sum()) == 16  # the unlabelled source's exact half of the epoch
