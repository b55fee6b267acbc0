import io
import re

import numpy as np
import pytest
from PIL import Image

from clippy_ray.data import benchmark as bm

SPEC = bm.BenchmarkSpec(seed=7, image_size=96)


def named_classes(caption: str) -> set[int]:
    found = set()
    for cls in range(1, len(bm.CLASSES)):
        name = bm.CLASSES[cls]
        if re.search(rf"\b({name}|{bm.PLURALS[name]})\b", caption):
            found.add(cls)
    return found


@pytest.mark.parametrize("split", bm.SPLITS)
def test_masks_agree_with_the_drawn_pixels(split):
    for index in range(12):
        scene = bm.make_scene(SPEC, split, index)
        assert scene.semantic.shape == scene.instance.shape == scene.image.shape[:2]
        # every instance pixel has its object's colour and class, every other pixel the texture
        for k, (cls, color) in enumerate(zip(scene.classes, scene.colors), start=1):
            where = scene.instance == k
            assert where.sum() > 0
            assert (scene.image[where] == bm.COLORS[color]).all()
            assert (scene.semantic[where] == cls).all()
        background = scene.instance == 0
        assert (scene.semantic[background] == 0).all()
        assert (scene.image[background] == scene.background_image[background]).all()


def test_captions_name_exactly_the_objects_present():
    for split in ("train", "val", "train-spurious"):
        for index in range(40):
            scene = bm.make_scene(SPEC, split, index)
            assert named_classes(scene.caption) == set(scene.classes), (scene.caption, scene.classes)


def test_caption_richness_changes_the_captions_only():
    import dataclasses

    plain = dataclasses.replace(SPEC, color_p=0.0, background_words=False)
    colourful = dataclasses.replace(SPEC, color_p=1.0)
    colour_words = re.compile(rf"\b({'|'.join(bm.COLORS)})\b")
    texture_words = re.compile(rf"\b({'|'.join(bm.BACKGROUND_WORDS.values())})\b|background|backdrop|pattern")
    for index in range(60):
        default, a, b = (bm.make_scene(s, "train", index) for s in (SPEC, plain, colourful))
        for scene in (a, b):  # the same picture, masks and objects as the default spec
            np.testing.assert_array_equal(scene.image, default.image)
            np.testing.assert_array_equal(scene.instance, default.instance)
            assert scene.classes == default.classes and scene.colors == default.colors
            assert named_classes(scene.caption) == set(scene.classes)
        assert not colour_words.search(a.caption) and not texture_words.search(a.caption), a.caption
        assert set(colour_words.findall(b.caption)) == set(b.colors), (b.caption, b.colors)
    defaults = [bm.make_scene(SPEC, "train", i).caption for i in range(60)]
    assert sum(bool(colour_words.search(c)) for c in defaults) in range(20, 50)  # about 60% name colours
    assert any(texture_words.search(c) for c in defaults)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not():
    a = bm.make_rows(SPEC, "train", 0, 5)
    b = bm.make_rows(SPEC, "train", 0, 5)
    assert a == b
    # rows depend on (seed, split, index) only, not on how rows are sharded
    assert bm.make_rows(SPEC, "train", 3, 5)["image"] == a["image"][3:5]
    c = bm.make_rows(bm.BenchmarkSpec(seed=8, image_size=96), "train", 0, 5)
    assert c["image"] != a["image"]


def test_encoded_masks_decode_to_the_label_maps():
    rows = bm.make_rows(SPEC, "val", 0, 3)
    for i in range(3):
        scene = bm.make_scene(SPEC, "val", i)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rows["mask"][i]))), scene.semantic)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rows["image"][i]))), scene.image)
        assert rows["labels"][i] == sorted(set(scene.classes))


def test_spurious_split_has_the_requested_co_occurrence_rate():
    spec = bm.BenchmarkSpec(seed=1, image_size=32, spurious_p=0.8)
    n = 600
    matched = sum(
        bm.make_scene(spec, "train-spurious", i).background
        == bm.spurious_background(bm.make_scene(spec, "train-spurious", i).classes[0])
        for i in range(n)
    )
    rate = matched / n
    assert abs(rate - 0.8) < 4 * (0.8 * 0.2 / n) ** 0.5  # within 4 standard errors
    for i in range(50):
        m = bm.make_scene(spec, "test-matched", i)
        s = bm.make_scene(spec, "test-swapped", i)
        assert m.background == bm.spurious_background(m.classes[0])
        assert s.background != bm.spurious_background(s.classes[0])
