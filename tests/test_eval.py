"""Evaluation: metrics against hand computations, tasks on a model with hand-set features, the
dataset readers, and the Ray runner (1 vs 2 workers, S3 output), and `segment` on a real photo."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from clippy_ray import config
from clippy_ray.eval import metrics
from clippy_ray.eval.datasets import (
    EvalDataError,
    EvalSet,
    Sample,
    detect_format,
    load_shard,
    open_eval_set,
    read_names,
)
from clippy_ray.eval.evaluator import Evaluator, label_map, pca_groups
from clippy_ray.eval.tasks import TASKS
from tests.conftest import tiny_config

# ------------------------------------------------------------------------------- metrics


def test_miou_ignores_255_and_skips_a_class_absent_from_truth_and_prediction():
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [255, 255, 255, 255]])
    pred = np.array(
        [[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 2], [3, 3, 3, 3]]
    )  # the ignored row predicts class 3, which must not count
    conf = metrics.confusion(pred, truth, num_classes=5)
    iou = metrics.iou_per_class(conf)
    # class 0: tp 3, fp 1 (a 2 -> 0), fn 1 (a 0 -> 1): 3/5. class 1: tp 4, fp 1: 4/5.
    # class 2: tp 3, fn 1: 3/4. class 3: predicted only on ignored pixels -> absent. class 4: absent.
    np.testing.assert_allclose(iou[:3], [3 / 5, 4 / 5, 3 / 4])
    assert math.isnan(iou[3]) and math.isnan(iou[4])
    assert metrics.mean_iou(conf) == pytest.approx((3 / 5 + 4 / 5 + 3 / 4) / 3)


def test_miou_from_summed_shards_differs_from_the_mean_of_shard_mious():
    a = metrics.confusion(np.array([1, 1, 1, 1]), np.array([1, 1, 1, 1]), 2)
    b = metrics.confusion(np.array([0, 0, 0, 1]), np.array([1, 1, 1, 1]), 2)
    # summed: class 1 tp 5 of 8 truth -> 5/8; class 0 tp 0 with 3 false positives -> 0: mean 5/16
    assert metrics.mean_iou(a + b) == pytest.approx(5 / 16)
    assert (metrics.mean_iou(a) + metrics.mean_iou(b)) / 2 != pytest.approx(5 / 16)


def test_confusion_rejects_labels_outside_the_class_range():
    with pytest.raises(ValueError, match="truth label 7 outside 0..2"):
        metrics.confusion(np.zeros((2, 2), int), np.full((2, 2), 7), 3)


def test_jaccard_matches_groups_to_segments_with_the_hungarian_assignment():
    segments = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 255, 255]])
    groups = np.array([[5, 5, 5, 7], [5, 5, 7, 7], [7, 9, 9, 9], [9, 9, 9, 9]])
    # IoU[segment, group] over the 14 scored pixels, by hand:
    # seg 0 = {(0,0),(0,1),(1,0),(1,1)}; seg 1 = {(0,2),(0,3),(1,2),(1,3)}; seg 2 = row 2 + (3,0),(3,1)
    # g5 = {(0,0),(0,1),(0,2),(1,0),(1,1)}; g7 = {(0,3),(1,2),(1,3),(2,0)}; g9 = {(2,1..3),(3,0),(3,1)}
    # (row 3 cols 2-3 are ignored).
    # seg0: g5 4/5, g7 0/8, g9 0/9.  seg1: g5 1/8, g7 3/5, g9 0/9.  seg2: g5 0, g7 1/9, g9 5/6.
    # Best assignment: seg0-g5, seg1-g7, seg2-g9 -> [4/5, 3/5, 5/6].
    np.testing.assert_allclose(metrics.matched_jaccard(groups, segments), [4 / 5, 3 / 5, 5 / 6])
    # One group for everything: only one segment can have it; the others score 0.
    one = metrics.matched_jaccard(np.zeros_like(groups), segments)
    np.testing.assert_allclose(sorted(one), [0, 0, 6 / 14])


def test_topk_counts_a_hit_when_any_label_of_a_row_is_in_the_top_k():
    logits = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.9], [0.3, 0.2, 0.1]])
    hits = metrics.topk_hits(logits, [[0], [1], [2, 0]], ks=(1, 2))
    assert hits == {1: 2, 2: 3}  # rows 0 and 2 hit at k=1; row 1 (top-2 = classes 2, 1) only at k=2


def test_domain_gap_per_class_and_overall():
    out = metrics.domain_gap(
        np.array([1, 1, 1, 0]),
        np.array([0, 0, 1, 1]),
        np.array([1, 0, 0, 0]),
        np.array([0, 0, 1, 1]),
        ["landbird", "waterbird"],
    )
    assert out["per_class"]["landbird"]["gap"] == pytest.approx(50.0)  # 100 -> 50
    assert out["per_class"]["waterbird"]["gap"] == pytest.approx(50.0)  # 50 -> 0
    assert out["gap"] == pytest.approx(75.0 - 25.0) and out["worst_class_gap"] == pytest.approx(50.0)


# ------------------------------------------------------------------------------- tasks, hand-set model

COLORS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float32)  # background + 3 classes
NAMES = [["background"], ["red"], ["green"], ["blue"]]


class HandSetModel(nn.Module):
    """Dense feature of a patch = one-hot of the class whose colour it shows; text embedding =
    one-hot of the class it names. The right segmentation is known exactly."""

    def __init__(self, tokenizer, patch: int = 8):
        super().__init__()
        self.tokenizer, self.patch = tokenizer, patch
        self.dummy = nn.Parameter(torch.zeros(1))  # dtype for the evaluator

    def dense_features(self, images):  # normalized [N, 3, H, W] -> [N, H/p, W/p, 4]
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        rgb = ((images * std + mean) * 255).float()
        cells = nn.functional.avg_pool2d(rgb, self.patch).permute(0, 2, 3, 1)  # [N, h, w, 3]
        dist = ((cells[..., None, :] - torch.from_numpy(COLORS)) ** 2).sum(-1)
        return nn.functional.one_hot(dist.argmin(-1), len(COLORS)).float()

    def encode_image(self, images):
        return self.dense_features(images).amax(dim=(1, 2))

    def encode_text(self, ids, mask):
        texts = self.tokenizer.hf.batch_decode(ids, skip_special_tokens=True)
        names = [n[0] for n in NAMES]
        return nn.functional.one_hot(torch.tensor([names.index(t.strip()) for t in texts]), len(names)).float()

    def scale(self):
        return torch.tensor([100.0])


def _paint(labels: np.ndarray, patch: int = 8) -> np.ndarray:
    return COLORS[np.kron(labels, np.ones((patch, patch), int))].astype(np.uint8)


@pytest.fixture
def hand_evaluator(tmp_path):
    from clippy_ray.tokenizer import build_tokenizer

    (tmp_path / "t.txt").write_text("{}\n")
    tok = build_tokenizer(tiny_config().model.text)
    data = EvalSet("parquet", "mem://", NAMES, True, "class", str(tmp_path / "t.txt"), {"eval": []})

    def make(**eval_overrides):
        cfg = config.from_dict({"eval": {"resolution": 32, **eval_overrides}}).eval
        return Evaluator(HandSetModel(tok), tok, data, cfg, torch.device("cpu"), 32, 8, ["{}"])

    return make


def test_seg_on_hand_set_features_scores_1_when_right_and_the_computed_value_when_partly_wrong(hand_evaluator):
    ev = hand_evaluator()
    cells = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    image = _paint(cells)
    truth = np.kron(cells, np.ones((8, 8), int))
    right = TASKS["seg"].run(ev, [Sample("a", image, truth)])
    assert metrics.mean_iou(right["confusion"]) == 1.0
    wrong_truth = truth.copy()
    wrong_truth[16:24, 16:32] = 1  # truth says red where blue is drawn: 128 px of class 3 predicted for class 1
    wrong = TASKS["seg"].run(ev, [Sample("b", image, wrong_truth)])
    # red: tp 256, fn 128 -> 256/384; blue: tp 128, fp 128 -> 1/2; background, green: 1.
    iou = metrics.iou_per_class(wrong["confusion"])
    np.testing.assert_allclose(iou, [1, 256 / 384, 1, 0.5])
    # Summed over both images: red tp 512 of a 640 px union; blue tp 384 of a 512 px union.
    assert metrics.mean_iou(right["confusion"] + wrong["confusion"]) == pytest.approx(
        np.mean([1, 512 / 640, 1, 384 / 512])
    )


def test_seg_reports_background_and_foreground_the_other_background_mode_and_the_largest_object_floor(
    hand_evaluator,
):
    ev = hand_evaluator(resolution=64)
    cells = np.kron(np.array([[0, 1, 1, 1], [0, 1, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]), np.ones((2, 2), int))
    truth = np.kron(cells, np.ones((8, 8), int))  # 64 x 64 px; red is the largest object
    part = TASKS["seg"].run(ev, [Sample("a", _paint(cells), truth)])
    out = TASKS["seg"].reduce({"eval": [part]}, ev.data)
    # right but for a few pixels where three regions' features are upsampled into each other
    iou = out["per_class_iou"]
    assert out["miou"] > 99 and out["background_iou"] == iou["background"] > 99
    assert out["foreground_miou"] == pytest.approx(np.mean([iou["red"], iou["green"], iou["blue"]]))
    # with a threshold on its best foreground class instead, the boundary pixels, where features
    # are blended and no class is 0.9 likely, become background: lower, not lost
    assert out["other_mode"]["background"] == "threshold" and 80 < out["other_mode"]["miou"] < out["miou"]
    # the floor paints all 4,096 px red: background 0 of 512, red 1,536 of 4,096, green and blue 0
    floor = out["floor_largest_object"]
    assert floor["miou"] == pytest.approx(100 * 0.375 / 4)
    assert floor["background_iou"] == 0 and floor["foreground_miou"] == pytest.approx(100 * 0.375 / 3)
    lines = "\n".join(TASKS["seg"].report_details(out))
    assert "| floor: every pixel the image's largest object (from the truth) | 9.38 | 0.00 | 12.50 |" in lines


def test_the_largest_object_floor_ignores_unscored_pixels_and_gives_background_without_an_object():
    truth = np.array([[0, 0, 2], [1, 255, 255], [255, 255, 255]])
    assert metrics.largest_object_map(truth, True).tolist() == [[1, 1, 1]] * 3  # a tie: the lower id
    assert metrics.largest_object_map(np.zeros((2, 2), int), True).tolist() == [[0, 0]] * 2
    assert metrics.largest_object_map(truth, False)[0, 0] == 0  # without background, 0 is a class


def test_threshold_background_marks_low_confidence_locations_as_background():
    scores = torch.tensor([[[0.9, 0.30]], [[0.1, 0.31]]])  # 2 foreground classes, 1x2 map
    assert label_map(scores, "threshold", 0.9, 100.0).tolist() == [[1, 0]]  # clear win; a tie -> background
    assert label_map(scores, "class", 0.9, 100.0).tolist() == [[0, 1]]


def test_classification_and_pca_grouping_on_hand_set_features(hand_evaluator):
    ev = hand_evaluator()
    samples = [Sample(str(c), _paint(np.full((4, 4), c)), labels=[c]) for c in (1, 2, 3)]
    out = TASKS["cls"].run(ev, samples)
    assert out["hits1"] == 3 and out["rows"] == 3
    # Grouping: a 3-colour image splits into 3 groups that match its 3 segments exactly.
    cells = np.array([[1, 1, 2, 2]] * 2 + [[3, 3, 3, 3]] * 2)
    feats = nn.functional.one_hot(torch.from_numpy(cells), 4).float()  # [4, 4, 4] dense map
    groups = pca_groups(feats, 8)
    assert metrics.matched_jaccard(groups.numpy(), cells) == [1.0, 1.0, 1.0]
    unsup = TASKS["unsup"].run(ev, [Sample("g", _paint(cells), mask=np.kron(cells, np.ones((8, 8), int)))])
    assert unsup["ious"] == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------- readers


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array.astype(np.uint8))
    if mode == "P":
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    img.save(buf, format="PNG")
    return buf.getvalue()


def _voc_folder(root, n: int = 3):
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    ids = []
    for i in range(n):
        cells = np.zeros((4, 4), int)
        cells[1:3, 1:3] = [15, 12, 8][i % 3]  # person, dog, cat
        mask = np.kron(cells, np.ones((8, 8), int))
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 255  # VOC's void border
        inst = np.where(mask == 255, 255, (mask > 0).astype(int))
        name = f"2007_{i:06d}"
        ids.append(name)
        Image.fromarray(np.full((32, 32, 3), 100 + i, np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        (voc / "SegmentationClass" / f"{name}.png").write_bytes(_png(mask, "P"))
        (voc / "SegmentationObject" / f"{name}.png").write_bytes(_png(inst, "P"))
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_reader_keeps_the_255_border_and_reads_palette_indices(tmp_path):
    root = _voc_folder(tmp_path)
    assert detect_format(str(root)) == "voc"
    data = open_eval_set(str(root), rows_per_shard=2)
    assert [len(s.rows) for s in data.splits["eval"]] == [2, 1]
    assert len(data.class_names) == 21 and data.class_names[15][0] == "person" and data.has_instances
    assert data.default_background == "threshold"
    samples = load_shard(data.splits["eval"][0])
    s = samples[0]
    assert s.image.shape == (32, 32, 3) and s.mask.shape == (32, 32)
    assert (s.mask[0] == 255).all() and s.mask[16, 16] == 15 and s.mask[4, 4] == 0  # indices, not colours
    assert s.labels == [15] and samples[1].labels == [12]
    assert set(np.unique(s.instances)) == {0, 1, 255}


def test_ade20k_and_waterbirds_readers(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    (ade / "images" / "validation").mkdir(parents=True)
    (ade / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(ade / "images" / "validation" / "ADE_val_1.jpg")
    ann = np.zeros((16, 16), np.uint8)
    ann[8:, :] = 3  # "sky" is 3 in the annotation, id 2 after the shift
    (ade / "annotations" / "validation" / "ADE_val_1.png").write_bytes(_png(ann))
    data = open_eval_set(str(tmp_path))
    assert data.fmt == "ade20k" and len(data.class_names) == 150 and not data.has_background
    s = load_shard(data.splits["eval"][0], data.has_background)[0]
    assert data.class_names[2] == ["sky"] and set(np.unique(s.mask)) == {2, 255} and s.labels == [2]

    wb = tmp_path / "waterbirds"
    wb.mkdir()
    rows = ["img_id,img_filename,y,split,place"]
    for i, (y, place, split) in enumerate([(0, 0, 2), (0, 1, 2), (1, 1, 2), (1, 1, 0), (1, 0, 2)]):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(wb / f"{i}.jpg")
        rows.append(f"{i},{i}.jpg,{y},{split},{place}")
    (wb / "metadata.csv").write_text("\n".join(rows) + "\n")
    data = open_eval_set(str(wb))
    assert data.fmt == "waterbirds"
    assert sum(len(s.rows) for s in data.splits["matched"]) == 2  # test split only, y == place
    assert sum(len(s.rows) for s in data.splits["swapped"]) == 2
    assert data.tasks_supported()["seg"] and data.tasks_supported()["robust"] is None


def test_shipped_class_files_have_the_papers_class_counts():
    assert [len(read_names(n)) for n in ("voc21", "ade150", "coco133")] == [21, 150, 133]
    with pytest.raises(EvalDataError, match="shipped: .*voc21"):
        read_names("voc22")


# ------------------------------------------------------------------------------- runner and CLI


@pytest.fixture(scope="module")
def eval_benchmark(tmp_path_factory, ray_local):
    from clippy_ray.data.benchmark import BenchmarkSpec
    from clippy_ray.data.commands import make_benchmark

    root = str(tmp_path_factory.mktemp("bench"))
    make_benchmark(
        root,
        rows=24,
        eval_rows=24,
        spec=BenchmarkSpec(seed=3, image_size=32),
        rows_per_shard=12,
        splits=("val", "test-matched", "test-swapped"),
    )
    return root


def test_eval_with_1_and_2_ray_workers_gives_identical_numbers(tiny_handoff, eval_benchmark, bucket):
    from clippy_ray.eval import eval_config, run_eval

    runs = {}
    for workers in (1, 2):
        cfg = eval_config(tiny_handoff, [f"eval.workers={workers}", "eval.rows_per_shard=5", "eval.examples=2"])
        out = f"s3://{bucket}/eval-{workers}" if workers == 2 else None
        runs[workers] = run_eval(tiny_handoff, eval_benchmark, cfg, out, log=lambda *_: None)
    one, two = runs[1]["results"], runs[2]["results"]
    assert json.dumps(one, sort_keys=True, default=float) == json.dumps(two, sort_keys=True, default=float)
    assert one["cls"]["rows"] == 24 and one["seg"]["pixels"] == 24 * 32 * 32
    assert one["robust"]["rows"] == {"matched": 24, "swapped": 24}
    assert 0 <= one["seg"]["miou"] <= 100 and 0 < one["unsup"]["jaccard"] <= 100
    import pyarrow.fs as pafs

    from clippy_ray import storage

    fs, path = storage.resolve(f"s3://{bucket}/eval-2")
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    assert names == {"results.json", "results.md", "seg_examples.png", "robust_examples.png"}
    with fs.open_input_file(f"{path}/results.json") as f:
        assert json.loads(f.read())["results"]["seg"]["miou"] == pytest.approx(two["seg"]["miou"])


def test_eval_refuses_a_task_the_data_cannot_serve_with_one_line(tiny_handoff, tmp_path, capsys):
    from clippy_ray.cli import main

    wb = tmp_path / "wb"
    wb.mkdir()
    (wb / "metadata.csv").write_text("img_filename,y,split,place\na.jpg,0,2,0\n")
    assert main(["eval", "--checkpoint", tiny_handoff, "--data", str(wb), "--tasks", "seg"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seg: waterbirds data has no segmentation masks" in err
    assert main(["eval", "--checkpoint", tiny_handoff, "--data", str(wb), "--tasks", "segm"]) == 2
    assert "eval.tasks: 'segm' is not one of cls, seg, unsup, robust" in capsys.readouterr().err


def test_eval_without_tasks_runs_the_ones_the_data_supports_and_names_the_skipped(
    tiny_handoff, eval_benchmark, tmp_path, capsys
):
    from clippy_ray.cli import main
    from clippy_ray.eval.datasets import benchmark_class_names

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(",".join(names) for names in benchmark_class_names()) + "\n")
    out = tmp_path / "out"
    args = ["eval", "--checkpoint", tiny_handoff, "--data", f"{eval_benchmark}/val", "--classes", str(classes)]
    assert main([*args, "--out", str(out), "--max-rows", "8", "eval.workers=1", "eval.examples=0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    skipped = "robust (parquet data has no matched/swapped background splits"
    assert any(line.startswith(f"[clippy-ray] eval: skipped {skipped}") for line in lines), lines
    report = json.loads((out / "results.json").read_text())
    assert list(report["results"]) == ["cls", "seg", "unsup"] and list(report["meta"]["skipped"]) == ["robust"]
    assert f"- skipped: {skipped}" in (out / "results.md").read_text()


def test_segment_writes_a_picture_of_the_expected_size_for_a_real_photo(tiny_handoff, tmp_path, capsys):
    import skimage.data

    from clippy_ray.cli import main
    from clippy_ray.eval.visualize import TITLE_H

    photo = skimage.data.chelsea()  # 300 x 451, ships with scikit-image
    Image.fromarray(photo).save(tmp_path / "cat.jpg")
    out = tmp_path / "pics" / "cat.png"
    assert (
        main(
            [
                "segment",
                "--checkpoint",
                tiny_handoff,
                "--image",
                str(tmp_path / "cat.jpg"),
                "--labels",
                "cat,grass|lawn,sky",
                "--out",
                str(out),
                "--templates",
                "simple",
            ]
        )
        == 0
    )
    picture = Image.open(out)
    h, w = photo.shape[:2]
    legend_w, gap = 140, 4
    assert picture.size == (3 * w + legend_w + 3 * gap, h + TITLE_H)
    assert "wrote" in capsys.readouterr().out


def test_a_shard_reads_exactly_its_rows_across_row_group_boundaries(tmp_path, bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clippy_ray import storage
    from clippy_ray.eval.datasets import _read_rows

    table = pa.table({"key": [f"r{i}" for i in range(23)], "x": list(range(23))})
    local = tmp_path / "t.parquet"
    pq.write_table(table, local, row_group_size=5)  # groups [0,5) [5,10) [10,15) [15,20) [20,23)
    storage.write_bytes(f"s3://{bucket}/eval/t.parquet", local.read_bytes())
    for uri in (str(local), f"s3://{bucket}/eval/t.parquet"):
        cache = {}
        for start, stop in ((0, 5), (3, 12), (9, 10), (14, 23), (0, 23), (6, 8)):
            for c in (None, cache):
                assert _read_rows(uri, start, stop, c).column("x").to_pylist() == list(range(start, stop)), (
                    uri,
                    start,
                    stop,
                )
        assert list(cache) == [(uri, (1,))]  # only the last row groups read are kept


def test_prompts_take_the_article_their_class_name_needs():
    from clippy_ray.eval.datasets import fill, read_templates

    assert [fill(t, "arrow") for t in ("a {}", "a photo of a {}.", "A {} here", "an image with {}")] == [
        "an arrow",
        "a photo of an arrow.",
        "An arrow here",
        "an image with arrow",
    ]
    assert fill("a {}", "circle") == "a circle" and fill("a photo of a {}.", "eagle") == "a photo of an eagle."
    assert (
        fill(read_templates("benchmark")[0], "arrow").startswith("an arrow")
        or "{}" not in read_templates("benchmark")[0]
    )
