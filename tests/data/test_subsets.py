"""few_shot: N images of each class of another source's train split, stratified, seeded and stable."""

import pytest
import torch

from kdforge.data import Skipped
from kdforge.data.subsets import SubsetDataset, dataset_labels, few_shot_indices
from kdforge.errors import DataError, KdforgeError, RecipeError
from kdforge.plugins import create
from kdforge.recipe import load_recipe

from cli_helpers import TINY

PROCEDURAL = {"plugin": "procedural", "num_train": 300, "num_val": 40, "image_size": 8, "num_classes": 4}


def few_shot(per_class=5, seed=0, source=PROCEDURAL):
    table = {"plugin": "few_shot", "source": source, "per_class": per_class, "seed": seed}
    return create("data_sources", table, "data")


def test_exactly_n_images_of_each_class_with_their_labels_and_new_positions():
    src = few_shot(per_class=7)
    inner = src.inner.build("train", None)
    ds = src.build("train", None)
    assert src.num_classes == 4 and isinstance(ds, SubsetDataset)
    assert len(ds) == 28 and torch.bincount(ds.labels, minlength=4).tolist() == [7, 7, 7, 7]
    assert len(set(ds.indices.tolist())) == 28
    for i in (0, 13, 27):
        item, original = ds[i], inner[int(ds.indices[i])]
        assert item["index"] == i and item["label"] == original["label"] == int(ds.labels[i])
        assert torch.equal(item["image"], original["image"])
    # the choice is not simply each class's first images
    first = torch.cat([torch.nonzero(inner.labels == c).flatten()[:7] for c in range(4)]).sort().values
    assert not torch.equal(ds.indices, first)


def test_other_splits_are_the_inner_sources_as_they_are():
    src = few_shot(per_class=2)
    val, inner_val = src.build("val", None), src.inner.build("val", None)
    assert len(val) == len(inner_val) == 40 and torch.equal(val.labels, inner_val.labels)
    assert src.splits == ("train", "val")


def test_the_same_seed_gives_the_same_images_and_a_larger_n_keeps_a_smaller_ones():
    a = few_shot(per_class=5, seed=3).build("train", None).indices
    flip = lambda x: x.flip(-1)  # noqa: E731 - another transform changes the images, not the choice
    assert torch.equal(a, few_shot(per_class=5, seed=3).build("train", flip).indices)
    assert not torch.equal(a, few_shot(per_class=5, seed=4).build("train", None).indices)
    larger = few_shot(per_class=9, seed=3).build("train", None).indices
    assert set(a.tolist()) < set(larger.tolist())


def test_one_classs_choice_does_not_depend_on_the_others():
    labels = torch.tensor([0, 1, 0, 1, 2, 0, 1, 2, 0, 2, 0, 1])
    both = few_shot_indices(labels, [0, 1], 2, seed=11)
    relabelled = labels.clone()
    relabelled[labels == 1] = 2  # class 1's items now belong to class 2: class 0's choice must stay
    assert torch.equal(few_shot_indices(relabelled, [0], 2, seed=11)[0], both[0])
    for c in (0, 1):
        assert len(both[c]) == 2 and bool((labels[both[c]] == c).all())


def test_labels_are_read_without_decoding_images(imagenet_tree, monkeypatch):
    import kdforge.data.datasets as datasets

    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded to read a label")

    monkeypatch.setattr(datasets, "read_image", refuse)
    ds = few_shot(per_class=3, source={"plugin": "image_folder", "root": str(imagenet_tree)}).build("train", None)
    assert len(ds) == 9 and torch.bincount(ds.labels).tolist() == [3, 3, 3]


def test_labels_fall_back_to_loading_items_and_unreadable_ones_are_never_chosen():
    class Plain(torch.utils.data.Dataset):  # no `labels` attribute: every item is loaded
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 2:
                return Skipped("/x/2.jpg", "OSError: broken")
            return {"image": torch.rand(3, 2, 2), "label": i % 2, "index": i}

    state = torch.get_rng_state()
    labels = dataset_labels(Plain())
    assert labels.tolist() == [0, 1, -2, 1, 0, 1]
    assert torch.equal(state, torch.get_rng_state())  # the scan leaves the global generator alone
    assert sorted(few_shot_indices(labels, [0], 5, seed=0)[0].tolist()) == [0, 4]


def test_unreadable_items_pass_through(imagenet_tree, corrupt_writer):
    for name in ("ant", "bee", "cat"):  # each class: 4 images and 3 broken files, all 7 chosen
        corrupt_writer(imagenet_tree / "train" / name, imagenet_tree / "train" / "bee" / "bee_1.png")
    ds = few_shot(per_class=7, source={"plugin": "image_folder", "root": str(imagenet_tree)}).build("train", None)
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == 21 and sum(isinstance(it, Skipped) for it in items) == 9
    assert [it["index"] for it in items if not isinstance(it, Skipped)] == \
        [i for i, it in enumerate(items) if not isinstance(it, Skipped)]


def test_a_class_with_too_few_images_is_named_with_its_count_and_the_fix(imagenet_tree):
    with pytest.raises(DataError) as exc:
        few_shot(per_class=5, source={"plugin": "image_folder", "root": str(imagenet_tree)}).build("train", None)
    msg = str(exc.value)
    assert "data.per_class = 5" in msg and "class 0 ('ant') has 4" in msg and "class 2 ('cat') has 4" in msg
    assert "lower data.per_class to 4" in msg


def test_procedural_classes_are_named_too():
    with pytest.raises(DataError, match=r"class 3 \('cross'\) has \d+"):
        few_shot(per_class=200).build("train", None)


def test_an_unlabelled_source_is_refused(tmp_path, image_writer):
    for i in range(3):
        image_writer(tmp_path / "flat" / f"{i}.png", i)
    with pytest.raises(DataError, match="unlabelled: use a labelled source"):
        few_shot(per_class=1, source={"plugin": "image_folder", "root": str(tmp_path / "flat")}).build("train", None)


@pytest.mark.parametrize("source, message", [
    ({"plugin": "procedural", "num_trian": 5}, "unknown key 'num_trian' in [data.source]: did you mean 'num_train'?"),
    ({"num_train": 5}, "[data.source] needs `plugin = \"...\"` naming one of"),
    ({"plugin": "digitz"}, "unknown data source 'digitz' in [data.source]: did you mean 'digits'?"),
    ({"plugin": "procedural", "num_classes": 40}, "[data.source]: num_classes must be between 2 and 12"),
])
def test_nested_config_errors_name_the_key_when_the_recipe_is_resolved(source, message):
    with pytest.raises(KdforgeError) as exc:
        load_recipe(TINY, overrides=[f"data={{plugin='few_shot', source={_toml(source)}}}"])
    assert message in str(exc.value)


def test_per_class_must_be_positive():
    with pytest.raises(RecipeError, match=r"data.per_class = 0 is out of range: it must be >= 1"):
        few_shot(per_class=0)


def _toml(table: dict) -> str:
    return "{" + ", ".join(f"{k}={v!r}" for k, v in table.items()) + "}"
