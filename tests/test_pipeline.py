import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clippy_ray import storage
from clippy_ray.config import DataConfig, TextConfig
from clippy_ray.data import benchmark as bm
from clippy_ray.data.commands import convert, inspect, make_benchmark
from clippy_ray.data.formats import check_dataset, detect
from clippy_ray.data.pipeline import BatchStream, build_dataset
from clippy_ray.data.plan import DataFile, RepeatedRows, TrainedRows, list_files, pieces
from clippy_ray.data.schema import DataSchemaError

TEXT = TextConfig(tokenizer="byte", max_length=24)
SPEC = bm.BenchmarkSpec(seed=3, image_size=48)


def png(color=(10, 200, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


NONE_SKIPPED = {f"skipped_{r}": 0 for r in ("no_image", "no_caption", "undecodable_image", "unreadable_shard")}


def all_batches(ds, batch_size, **kw):
    stream = BatchStream(ds, batch_size, **kw)
    return list(stream.epoch(0)), stream


def test_benchmark_round_trips_through_s3_into_ray_data_batches(ray_local, bucket):
    make_benchmark(f"s3://{bucket}/bench", rows=40, eval_rows=8, spec=SPEC, rows_per_shard=16, splits=("train", "val"))
    assert storage.exists(f"s3://{bucket}/bench/benchmark.json")
    ds = build_dataset(f"s3://{bucket}/bench/train", DataConfig(decode_batch_size=8), TEXT, image_size=32, train=True)
    batches, stream = all_batches(ds, 16)
    assert len(batches) == 2 and stream.counters() == {
        "rows_seen": 40,
        "rows_skipped": 0,
        "rows_dropped": 8,
        **NONE_SKIPPED,
    }
    batch = batches[0]
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (16, 24)
    assert batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"][:, 0].all()


def test_hf_datasets_image_struct_and_a_renamed_caption_column_are_train_ready(ray_local, tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": png((i * 20, 0, 0)), "path": f"{i}.png"} for i in range(10)], type=image_type),
            "text": [f"a photo number {i}" for i in range(10)],
        }
    )
    pq.write_table(table, tmp_path / "hf.parquet")
    cfg = DataConfig(caption_column="text", decode_batch_size=4)
    ds = build_dataset(str(tmp_path / "hf.parquet"), cfg, TEXT, image_size=16, train=False)
    batches, stream = all_batches(ds, 5)
    assert len(batches) == 2 and stream.rows_skipped == 0
    # eval transform is deterministic: resize + center crop of a solid colour keeps the colour
    reds = sorted(int(b["image"][i, 0, 8, 8]) for b in batches for i in range(5))
    assert reds == [i * 20 for i in range(10)]


def test_ten_percent_corrupt_images_yield_exactly_the_good_rows_and_count_the_bad(ray_local, tmp_path):
    n = 50
    bad = set(range(0, n, 10))  # 10%
    images = [b"\x89PNG\r\n\x1a\nnot really a png" if i in bad else png((i, i, i)) for i in range(n)]
    pq.write_table(pa.table({"image": images, "caption": [f"row {i}" for i in range(n)]}), tmp_path / "c.parquet")
    ds = build_dataset(str(tmp_path / "c.parquet"), DataConfig(decode_batch_size=7), TEXT, image_size=8, train=False)
    batches, stream = all_batches(ds, 9)
    assert stream.counters() == {
        "rows_seen": 50, "rows_skipped": 5, "rows_dropped": 0, **NONE_SKIPPED, "skipped_undecodable_image": 5
    }  # fmt: skip
    got = sorted(int(b["image"][i, 0, 4, 4]) for b in batches for i in range(9))
    assert got == sorted(i for i in range(n) if i not in bad)


def test_empty_and_missing_captions_and_missing_images_are_skipped_and_counted(ray_local, tmp_path):
    table = pa.table({"image": [png(), None, png(), png()], "caption": ["ok", "no image", "", None]})
    pq.write_table(table, tmp_path / "m.parquet")
    ds = build_dataset(str(tmp_path / "m.parquet"), DataConfig(), TEXT, image_size=8, train=True)
    batches, stream = all_batches(ds, 1)
    assert len(batches) == 1 and stream.rows_skipped == 3
    assert stream.skipped == {"no image": 1, "no caption": 2, "undecodable image": 0, "unreadable shard": 0}


def test_wrong_schema_fails_at_start_with_one_line_listing_the_columns(tmp_path):
    pq.write_table(pa.table({"img": [png()], "caption": ["x"]}), tmp_path / "w.parquet")
    with pytest.raises(DataSchemaError) as err:
        check_dataset(str(tmp_path / "w.parquet"), "data.train", "image", "caption")
    message = str(err.value)
    assert "no image column 'image' (set data.image_column)" in message
    assert "columns found: img (binary), caption (string)" in message and "\n" not in message


def numbered_files(folder: Path, sizes: list[int], row_group: int = 16) -> list:
    """Parquet files of `sizes` rows each, captions "<file>:<row>", small row groups."""
    folder.mkdir(exist_ok=True)
    for f, n in enumerate(sizes):
        table = pa.table({"image": [b"x"] * n, "caption": [f"{f}:{r}" for r in range(n)]})
        pq.write_table(table, folder / f"part-{f}.parquet", row_group_size=row_group)
    return list_files(str(folder))


def plan_rows(files, seed: int, spans, shuffle: bool = True) -> list:
    """(file, row, position) of every row a plan reads, in plan order."""
    return [
        (p.uri, r, p.base + r)
        for p in pieces(files, seed, spans, shuffle)
        for start, stop in p.ranges
        for r in range(start, stop)
    ]


def test_a_plan_from_any_position_is_the_tail_of_the_plan_from_zero_across_epochs():
    files = [DataFile(f"f{i}", rows, rows * 100) for i, rows in enumerate([5, 3, 7, 0, 4])]  # 19 rows an epoch
    full = plan_rows(files, 1, [(0, 80)])
    assert [pos for *_, pos in full] == list(range(len(full)))
    epochs = [sorted((u, r) for u, r, _ in full[e * 19 : (e + 1) * 19]) for e in range(4)]
    assert all(e == epochs[0] for e in epochs)  # every epoch reads each row once...
    assert len({tuple(u for u, *_ in full[e * 19 : (e + 1) * 19]) for e in range(4)}) > 1  # ...in a new file order
    for start in range(60):
        assert plan_rows(files, 1, [(start, 80)]) == full[start:80], start
    assert pieces(files, 1, [(0, 19)], shuffle=False)[0].uri == "f0"


def test_a_plan_of_scattered_spans_reads_exactly_those_positions_one_piece_per_file_and_epoch():
    files = [DataFile(f"f{i}", rows, rows * 100) for i, rows in enumerate([5, 3, 7, 0, 4])]
    full = plan_rows(files, 2, [(0, 100)])
    spans = [(1, 2), (3, 9), (12, 13), (40, 41), (57, 58), (60, 100)]  # 57: an epoch's last row
    want = [row for row in full if any(lo <= row[2] < hi for lo, hi in spans)]
    assert plan_rows(files, 2, spans) == want
    plan = pieces(files, 2, spans)
    keys = [(p.uri, p.base // 19) for p in plan]
    assert len(keys) == len(set(keys))  # the holes of one file in one epoch are one read


def test_trained_rows_record_each_position_once_and_the_untrained_rest_is_its_exact_complement():
    rng = np.random.default_rng(0)
    record = TrainedRows()
    order = rng.permutation(5000)
    consumed = set()
    for chunk in np.array_split(order[:3000], 37):  # out of order, like parallel readers and buffers
        record.add(chunk)
        consumed.update(chunk.tolist())
        assert record.count == len(consumed)
        assert record.low == min(set(range(5001)) - consumed)
    spans = record.untrained(6000)
    untrained = [p for lo, hi in spans for p in range(lo, hi)]
    assert len(untrained) == 6000 and untrained == sorted(untrained)
    assert set(untrained[: 5000 - len(consumed)]) == set(range(5000)) - consumed
    assert not consumed & set(untrained)
    back = TrainedRows.from_dict(json.loads(json.dumps(record.to_dict())))
    assert (back.low, back.high, back.bits.tolist()) == (record.low, record.high, record.bits.tolist())
    with pytest.raises(RepeatedRows, match="1 rows trained on before") as err:
        record.add(np.array([int(order[5]), int(order[4000])]))
    assert err.value.positions.tolist() == [int(order[5])]
    assert record.count == len(consumed)  # refused whole: nothing was added
    with pytest.raises(RepeatedRows):
        record.add(np.array([int(order[4000])] * 2))
    assert TrainedRows().untrained(10) == [(0, 10)]


def test_a_stream_started_at_a_position_reads_only_what_comes_after_it(ray_local, tmp_path):
    from clippy_ray.data.pipeline import read_plan

    files = numbered_files(tmp_path / "d", [50, 30, 70, 45])
    cfg = DataConfig(block_mib=1)

    def read(spans) -> list:
        rows = read_plan(pieces(files, 3, spans), detect(str(tmp_path / "d"), "data"), cfg).iter_rows()
        return sorted((int(r["position"]), r["caption"]) for r in rows)

    full = read([(0, 400)])
    assert [pos for pos, _ in full] == list(range(len(full))) and len(full) >= 400
    for start in (7, 123, 333):  # in a row group, in another file, in the second epoch
        assert read([(start, start + 50)]) == full[start : start + 50]
    holes = [(3, 4), (9, 30), (31, 33), (198, 201), (260, 270)]  # within and across row groups and files
    assert read(holes) == [row for row in full if any(lo <= row[0] < hi for lo, hi in holes)]


def numbered_blocks(ray, rows: int, block_rows: int):
    """A real Ray Dataset shaped like the decoded stream: `id`, an `image` whose pixels are the id,
    and `valid` = 0 on every 7th row; blocks of `block_rows`, delivered in order."""

    def decoded(batch):
        ids = batch["id"]
        return {
            "id": ids,
            "image": np.broadcast_to(ids[:, None, None] % 251, (len(ids), 2, 2)).astype(np.uint8),
            "valid": (ids % 7 != 3).astype(np.uint8),
        }

    return ray.data.range(rows, override_num_blocks=rows // block_rows).map_batches(decoded, batch_size=None)


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_batch_stream_yields_each_valid_row_once_and_shuffles_within_its_buffer(ray_local, shuffle_buffer):
    ray_local.data.DataContext.get_current().execution_options.preserve_order = True
    try:
        ds = numbered_blocks(ray_local, rows=200, block_rows=10)
        valid = [i for i in range(200) if i % 7 != 3]
        stream = BatchStream(ds, batch_size=4, shuffle_buffer=shuffle_buffer, seed=1)
        stream.COMPACT_AT = 2  # compacts a few times here (the default 4 would not on 200 rows)
        fill = shuffle_buffer + 4
        epoch0 = []
        for batch in stream.epoch(0):
            assert batch["id"].shape == (4,) and batch["image"].shape == (4, 2, 2)
            assert torch.equal(batch["image"][:, 0, 0], (batch["id"] % 251).to(torch.uint8))  # rows stay whole
            assert stream._pinned <= 2 * fill + 10  # pinned blocks bounded (+ the block just added)
            epoch0.append(batch["id"].tolist())
        ids = [i for b in epoch0 for i in b]
        counts = {"rows_seen": 200, "rows_skipped": 200 - len(valid), "rows_dropped": len(valid) % 4}
        assert stream.counters() == counts | NONE_SKIPPED  # (these blocks carry no reasons)
        assert len(set(ids)) == len(ids) and set(ids) <= set(valid) and len(ids) == len(valid) // 4 * 4
        if not shuffle_buffer:
            assert ids == valid[: len(ids)]
            return
        assert ids != sorted(ids)
        assert max(epoch0[0]) < valid[fill + 10]  # first batch drawn from the first buffer-full (+ one block)
        again = [b["id"].tolist() for b in BatchStream(ds, 4, shuffle_buffer, seed=1).epoch(0)]
        assert again == epoch0  # same seed, epoch and block order -> same batches; compacting changes nothing
        assert [b["id"].tolist() for b in BatchStream(ds, 4, shuffle_buffer, seed=1).epoch(1)] != epoch0
    finally:
        ray_local.data.DataContext.get_current().execution_options.preserve_order = False


def test_inspect_reports_rows_columns_captions_and_decodable_images(tmp_path):
    images = [png(), b"garbage", png()]
    pq.write_table(pa.table({"image": images, "caption": ["a", "b", "c"]}), tmp_path / "i.parquet")
    report = inspect(str(tmp_path / "i.parquet"))
    assert report["rows"] == 3 and report["decoded"] == 2 and report["captions"] == ["a", "b", "c"]
    assert report["columns"] == {"image": "binary", "caption": "string"}
    assert report["bad"] == {"undecodable image": 1} and report["image_size"] == [40, 30]


def test_convert_folder_with_csv_index_to_sharded_parquet_on_s3(ray_local, tmp_path, bucket):
    (tmp_path / "imgs").mkdir()
    lines = ["path,caption"]
    for i in range(7):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png((i, 0, 0)))
        lines.append(f"imgs/{i}.png,a red square number {i}")
    lines += ["imgs/missing.png,gone", "imgs/0.png,"]  # a missing file and an empty caption
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "imgs" / "3.png").write_bytes(b"corrupt")
    report = convert(str(tmp_path / "index.csv"), f"s3://{bucket}/cc", rows_per_shard=3)
    assert (report["rows"], report["written"], report["skipped"]) == (9, 6, 3)
    back = inspect(f"s3://{bucket}/cc")
    assert back["rows"] == 6 and back["decoded"] == 6 and back["files"] >= 2
    with pytest.raises(ValueError, match="not empty"):
        convert(str(tmp_path / "index.csv"), f"s3://{bucket}/cc")


def test_pipeline_feeds_two_ray_train_workers_on_two_cpus_without_hanging(ray_local, tmp_path):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    make_benchmark(str(tmp_path / "b"), rows=32, eval_rows=0, spec=SPEC, rows_per_shard=8, splits=("train",))
    ds = build_dataset(str(tmp_path / "b" / "train"), DataConfig(decode_batch_size=8), TEXT, image_size=32, train=True)

    def loop(config):
        import json

        import ray.train

        stream = BatchStream(ray.train.get_dataset_shard("train"), batch_size=4, shuffle_buffer=8)
        shapes = [tuple(b["image"].shape) for b in stream.epoch(0)]
        rank = ray.train.get_context().get_world_rank()
        with open(f"{config['out']}/rank{rank}.json", "w") as f:
            json.dump({"shapes": shapes, **stream.counters()}, f)

    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": str(tmp_path)},
        datasets={"train": ds},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray_local.train.RunConfig(storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    import json

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sum(r["rows_seen"] for r in reports) == 32  # the two shards cover the dataset once
    for r in reports:
        assert r["shapes"] and all(tuple(s) == (4, 3, 32, 32) for s in r["shapes"])


def test_the_validation_stream_is_the_same_first_rows_every_time(ray_local, tmp_path):
    numbered_files(tmp_path / "v", [30, 30, 30])
    cfg = DataConfig(decode_batch_size=8)
    ds = build_dataset(str(tmp_path / "v"), cfg, TEXT, image_size=8, train=False, rows=40)

    def positions() -> list[int]:
        return sorted(int(p) for batch in ds.iter_batches(batch_format="numpy") for p in batch["position"])

    first = positions()
    assert first[:40] == list(range(40)) and len(first) <= 60  # files in sorted order, whole files
    assert positions() == first  # each validation reads the same rows
