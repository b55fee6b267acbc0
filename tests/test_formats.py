"""The layouts users already have: WebDataset shards (written with the real `webdataset` library),
img2dataset's three outputs (the real `img2dataset` against images on a local HTTP server),
detected, counted and read with every sample's data position; bad samples skipped and counted."""

from __future__ import annotations

import functools
import http.server
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clippy_ray import storage
from clippy_ray.config import DataConfig, TextConfig
from clippy_ray.data.formats import FormatError, detect, expand, read_samples, shard_sizes, split_name
from clippy_ray.data.plan import list_files

TEXT = TextConfig(tokenizer="byte", max_length=16)


def png(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, bad: dict | None = None, json_captions: bool = False):
    """`shards` .tar shards of `per_shard` samples each, written by webdataset's ShardWriter;
    sample i's caption is `sample i`. `bad`: {sample index: "no caption" | "not an image"}."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            sample = {"__key__": f"{i:08d}"}
            sample["png" if bad.get(i) != "not an image" else "cls"] = png(i) if bad.get(i) != "not an image" else b"7"
            if bad.get(i) != "no caption":
                if json_captions:
                    sample["json"] = json.dumps({"caption": f"sample {i}", "url": "x"}).encode()
                else:
                    sample["txt"] = f"sample {i}".encode()
            sink.write(sample)
    return folder


# ------------------------------------------------------------------------------- naming (no Ray)


def test_shard_lists_expand_as_openclip_writes_them():
    assert expand("s3://b/cc/{00000..00002}.tar") == [f"s3://b/cc/{i:05d}.tar" for i in range(3)]
    assert expand("a/{0..1}.tar::b/{x,y}-{8..9}.tar") == [
        "a/0.tar",
        "a/1.tar",
        "b/x-8.tar",
        "b/x-9.tar",
        "b/y-8.tar",
        "b/y-9.tar",
    ]
    assert split_name("shard/000123.seg.png") == ("shard/000123", "seg.png")
    assert split_name("000123.JPG") == ("000123", "jpg")


def test_each_layout_is_detected_with_a_line_saying_what(tmp_path):
    write_shards(tmp_path / "wds", 2, 3)
    layout = detect(str(tmp_path / "wds"), "data.train")
    assert layout.format == "webdataset" and len(layout.shards) == 2
    assert layout.note.startswith("data.train: WebDataset, 2 .tar shard(s) from a folder")
    listed = detect(str(tmp_path / "wds" / "{00000..00001}.tar"), "data.train")
    assert listed.shards == layout.shards and "from a shard list" in listed.note
    # img2dataset's parquet: `jpg` + `caption` (+ key, status): the image column is found
    table = pa.table({"key": ["0"], "jpg": [png(0)], "caption": ["a"], "status": ["success"]})
    pq.write_table(table, tmp_path / "i2d.parquet")
    layout = detect(str(tmp_path / "i2d.parquet"), "data.train")
    assert (layout.format, layout.image_column, layout.caption_column) == ("parquet", "jpg", "caption")
    assert layout.note.endswith("(image column 'jpg' detected)") and "img2dataset parquet" in layout.note
    (tmp_path / "files" / "00000").mkdir(parents=True)
    (tmp_path / "files" / "00000" / "000000000.jpg").write_bytes(png(0))
    (tmp_path / "files" / "00000" / "000000000.txt").write_text("a")
    assert detect(str(tmp_path / "files"), "data.train").format == "files"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("x")
    with pytest.raises(FormatError, match=r"data.train=.*notes: no parquet, .tar shards or image files there"):
        detect(str(tmp_path / "notes"), "data.train")
    with pytest.raises(FormatError, match="is not one of auto, parquet, webdataset, files"):
        detect(str(tmp_path / "wds"), "data.train", "tfrecord")
    with pytest.raises(FormatError, match="no .parquet files there"):
        detect(str(tmp_path / "wds"), "data.train", "parquet")


def test_sample_counts_come_from_sizes_json_img2dataset_stats_or_the_shard_itself(tmp_path):
    folder = write_shards(tmp_path / "wds", 3, 4)
    layout = detect(str(folder), "data.train")
    assert shard_sizes(layout) == ([4, 4, 4], "shard headers read")
    (folder / "00001_stats.json").write_text(json.dumps({"successes": 4, "count": 6}))
    assert shard_sizes(layout) == ([4, 4, 4], "img2dataset's _stats.json and shard headers read")
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 4, "00001.tar": 4, "00002.tar": 4}))
    assert shard_sizes(layout) == ([4, 4, 4], "sizes.json")
    (folder / "sizes.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="sizes.json: not a {shard name: samples} JSON object"):
        shard_sizes(layout)


def test_a_shards_sample_ranges_come_out_exactly_bad_ones_flagged(tmp_path):
    folder = write_shards(tmp_path / "wds", 1, 10, bad={2: "no caption", 5: "not an image"}, json_captions=True)
    shard = str(folder / "00000.tar")
    got = list(read_samples("webdataset", shard, [(1, 3), (5, 7)], 10, "caption"))
    assert [s.index for s in got] == [1, 2, 5, 6]
    assert [s.caption for s in got] == ["sample 1", None, "sample 5", "sample 6"]  # 2: no caption
    assert got[0].image == png(1) and got[2].image is None and got[3].image == png(6)  # 5: a .cls, no image
    # counted larger than it is (a stale sizes.json): the missing samples come out flagged, once each
    short = list(read_samples("webdataset", shard, [(8, 12)], 12, "caption"))
    assert [s.index for s in short] == [8, 9, 10, 11]
    assert [bool(s.skip) for s in short] == [False, False, True, True]
    assert "has 10 samples, counted 12" in short[-1].skip


def test_a_truncated_shard_gives_what_it_holds_and_flags_the_rest(tmp_path):
    folder = write_shards(tmp_path / "wds", 1, 10)
    data = (folder / "00000.tar").read_bytes()
    (folder / "00000.tar").write_bytes(data[: len(data) // 2])
    got = list(read_samples("webdataset", str(folder / "00000.tar"), [(0, 10)], 10, "caption"))
    assert [s.index for s in got] == list(range(10))  # every position exactly once
    good = [s for s in got if not s.skip]
    assert 2 <= len(good) < 10 and [s.index for s in good] == list(range(len(good)))
    assert all(s.caption == f"sample {s.index}" for s in good)
    assert got[-1].skip.startswith(f"unreadable shard: {folder / '00000.tar'}: ")
    assert got[-1].skip.endswith(f"after {len(good)} sample(s)")
    # counted by reading it: its whole samples are its samples, and the cut is said once
    problems: list[str] = []
    assert [f.rows for f in list_files(str(folder), None, problems)] == [len(good)]
    assert problems == [got[-1].skip]


def test_files_layout_samples_by_key_in_each_folder(tmp_path):
    root = tmp_path / "files"
    for shard in range(2):
        (root / f"{shard:05d}").mkdir(parents=True)
        for k in range(3):
            key = root / f"{shard:05d}" / f"{shard}{k:08d}"
            key.with_suffix(".jpg").write_bytes(png(shard * 10 + k))
            if (shard, k) != (1, 1):
                key.with_suffix(".txt").write_text(f"s{shard} k{k}")
            key.with_suffix(".json").write_text("{}")
    layout = detect(str(root), "data.train")
    files = list_files(str(root), layout)
    assert [f.rows for f in files] == [3, 3]
    got = list(read_samples("files", files[1].uri, [(0, 3)], 3, "caption"))
    assert [s.caption for s in got] == ["s1 k0", None, "s1 k2"]
    assert got[2].image == png(12)


# ------------------------------------------------------------------------------- through Ray Data


def test_webdataset_through_the_pipeline_every_position_once_bad_ones_counted(ray_local, tmp_path):
    from clippy_ray.data.pipeline import BatchStream, build_dataset

    bad = {3: "no caption", 7: "not an image"}
    folder = write_shards(tmp_path / "wds", 3, 8, bad=bad)
    (folder / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": 8 for i in range(3)}))
    data = (folder / "00002.tar").read_bytes()
    (folder / "00002.tar").write_bytes(data[: len(data) // 3])  # truncated after it was counted
    ds = build_dataset(str(folder), DataConfig(decode_batch_size=4, read_tasks=2), TEXT, 16, train=True)
    stream = BatchStream(ds, 2)
    positions = [p for b in stream.epoch(0) for p in b["position"].tolist()]
    consumed = np.sort(np.concatenate([np.array(positions), stream.take_consumed()]))
    counts = stream.counters()
    assert sorted(set(consumed.tolist())) == list(range(24))  # every position consumed, trained or skipped
    assert counts["skipped_no_caption"] == 1 and counts["skipped_no_image"] == 1
    assert counts["skipped_unreadable_shard"] >= 2 and counts["rows_skipped"] == 2 + counts["skipped_unreadable_shard"]
    (problem,) = stream.take_problems()
    assert problem.startswith(f"unreadable shard: {folder / '00002.tar'}")


def test_data_convert_writes_webdataset_shards_as_parquet_leaving_out_the_bad_samples(ray_local, tmp_path):
    from clippy_ray.data.commands import convert_dataset

    folder = write_shards(tmp_path / "wds", 2, 6, bad={1: "no caption", 8: "not an image"})
    report = convert_dataset(str(folder), str(tmp_path / "out"), rows_per_shard=4)
    assert (report["format"], report["rows"], report["written"], report["skipped"]) == ("webdataset", 12, 10, 2)
    table = pq.read_table(tmp_path / "out")
    assert sorted(table.column("caption").to_pylist()) == sorted(f"sample {i}" for i in range(12) if i not in (1, 8))
    assert all(image[:4] == b"\x89PNG" for image in table.column("image").to_pylist())
    # and it trains as parquet: the same samples, detected as parquet
    assert detect(str(tmp_path / "out"), "data.train").format == "parquet"


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """A local HTTP server on 127.0.0.1 serving 24 PNGs (and one non-image) for img2dataset."""
    root = tmp_path_factory.mktemp("www")
    for i in range(24):
        (root / f"{i}.png").write_bytes(png(i, 24))
    (root / "broken.png").write_bytes(b"not a png")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def img2dataset(server: str, out: Path, output_format: str) -> Path:
    """The real img2dataset CLI on a parquet URL list (24 good URLs, 1 non-image) -> `out`."""
    urls = out.parent / "urls.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not urls.exists():
        captions = [f"picture {i}" for i in range(24)] + ["broken"]
        pq.write_table(
            pa.table({"url": [f"{server}/{i}.png" for i in range(24)] + [f"{server}/broken.png"], "caption": captions}),
            urls,
        )
    cmd = [
        sys.executable, "-m", "img2dataset.main", "--url_list", str(urls), "--input_format", "parquet",
        "--url_col", "url", "--caption_col", "caption", "--output_format", output_format,
        "--output_folder", str(out), "--image_size", "16", "--processes_count", "1", "--thread_count", "4",
        "--number_sample_per_shard", "10", "--distributor", "multiprocessing", "--enable_wandb", "False",
        "--disallowed_header_directives", "[]",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------- training (Ray Train)


def test_webdataset_shards_on_s3_a_worker_killed_mid_run_and_every_sample_is_trained_once(
    ray_local, bench, tmp_path, bucket
):
    """6 shards of 100 samples (ShardWriter) on the S3 server, named by an OpenCLIP brace list, 3
    read tasks at once, 2 workers with shuffle buffers; a worker killed after the first checkpoint.
    The run finishes; every sample it trained on was trained once, the bad ones never, and the
    checkpoint's record is exactly what was trained plus the bad samples it skipped."""
    from clippy_ray.data.plan import DataFile, epoch_order
    from tests.test_train import batches_trained, fit_killing_a_worker, train_cfg, trained_set

    bad = {17: "no caption", 250: "not an image"}
    storage.upload(write_shards(tmp_path / "wds", 6, 100, bad=bad), f"s3://{bucket}/wds")
    steps, pairs, every = 16, 32, 4
    cfg = train_cfg(
        bench, str(tmp_path), "wds",
        f"data.train=s3://{bucket}/wds/{{00000..00005}}.tar", "data.val=null", "data.read_tasks=3",
        "data.block_mib=1", "data.decode_batch_size=32", "data.shuffle_buffer=64",
        f"train.global_batch_size={pairs}", f"train.steps={steps}", f"train.checkpoint_every={every}",
        "train.keep_checkpoints=100", "train.log_every=4", "train.max_failures=1", "train.record_batches=true",
    )  # fmt: skip
    result = fit_killing_a_worker(cfg, tmp_path / "wds" / f"step_{every:08d}", after_s=2)
    assert result.metrics["step"] == steps
    manifest = json.loads((tmp_path / "wds" / "data" / "train_files.json").read_text())
    assert manifest["format"] == "webdataset" and [f["rows"] for f in manifest["files"]] == [100] * 6
    trained = batches_trained(tmp_path / "wds")
    positions = trained[:, 2]
    assert sorted(set(trained[:, 0].tolist())) == list(range(1, steps + 1))
    assert len(positions) == steps * pairs and len(np.unique(positions)) == len(positions)
    # a bad sample is consumed (skipped and counted: the stream reads ahead, so in later epochs'
    # positions too) but never trained; the checkpoint's record is what was trained plus those
    files = [DataFile(f["uri"], f["rows"], 0) for f in manifest["files"]]
    bad_positions = set()
    for epoch in range(3):
        first = {f.uri: 600 * epoch + sum(g.rows for g in epoch_order(files, cfg.data.seed, epoch)[:k])
                 for k, f in enumerate(epoch_order(files, cfg.data.seed, epoch))}  # fmt: skip
        bad_positions |= {first[files[i // 100].uri] + i % 100 for i in bad}
    final = json.loads((tmp_path / "wds" / f"step_{steps:08d}" / "train_state.json").read_text())
    recorded = trained_set(final)
    assert set(positions.tolist()) <= recorded and recorded - set(positions.tolist()) <= bad_positions
    assert not bad_positions & set(positions.tolist())


def test_img2dataset_outputs_are_read_as_they_are_and_train(ray_local, bench, tmp_path, bucket, image_server):
    """The real img2dataset, all three output formats, from 24 images (and one broken URL) on a local
    HTTP server: each is detected and inspected as it is; the webdataset and parquet outputs stream
    from the S3 server, the files output trains from its folder."""
    from clippy_ray.data.commands import inspect
    from clippy_ray.train.trainer import fit
    from tests.test_train import train_cfg

    outs = {fmt: img2dataset(image_server, tmp_path / "i2d" / fmt, fmt) for fmt in ("webdataset", "parquet", "files")}
    for fmt, out in outs.items():
        report = inspect(str(out))
        # img2dataset's parquet keeps the failed URL's row (no jpg): skipped and counted; the others leave it out
        bad = {"no image": 1} if fmt == "parquet" else {}
        assert (report["format"], report["rows"], report["decoded"], report["bad"]) == (fmt, 24 + len(bad), 24, bad)
        assert report["image_size"] == [16, 16] and report["captions"][0].startswith("picture ")
    assert detect(str(outs["parquet"]), "data.train").image_column == "jpg"
    # from the S3 server, through Ray Data: every sample once, the failed URL's row counted
    from clippy_ray.data.pipeline import BatchStream, build_dataset

    for fmt in ("webdataset", "parquet"):
        storage.upload(outs[fmt], f"s3://{bucket}/{fmt}")
        ds = build_dataset(f"s3://{bucket}/{fmt}", DataConfig(decode_batch_size=8), TEXT, 16, train=True)
        stream = BatchStream(ds, 4)
        trained = [p for b in stream.epoch(0) for p in b["position"].tolist()]  # (trained or skipped:)
        assert sorted(stream.take_consumed().tolist()) == list(range(24 + (fmt == "parquet"))), fmt
        assert len(trained) == 24 and stream.skipped["no image"] == (fmt == "parquet"), fmt
    # and through Ray Train (one run: the WebDataset kill test above trains shards from S3)
    cfg = train_cfg(
        bench, str(tmp_path / "runs"), "files", f"data.train={outs['files']}", "data.val=null", "train.steps=2",
        "train.checkpoint_every=2", "train.global_batch_size=8",
    )  # fmt: skip
    assert fit(cfg).metrics["step"] == 2
    manifest = json.loads((tmp_path / "runs" / "files" / "data" / "train_files.json").read_text())
    assert manifest["format"] == "files" and [f["rows"] for f in manifest["files"]] == [10, 10, 4]
