import os

import pytest

from clippy_ray import storage


def test_s3_folder_round_trip_and_cache(tmp_path, bucket):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.txt").write_text("beta")
    storage.upload(src, f"s3://{bucket}/run/folder")
    assert storage.exists(f"s3://{bucket}/run/folder/sub/b.txt")
    local = storage.fetch(f"s3://{bucket}/run/folder")
    assert (local / "a.txt").read_text() == "alpha" and (local / "sub" / "b.txt").read_text() == "beta"
    assert storage.fetch(f"s3://{bucket}/run/folder") == local  # cached, not downloaded again


def test_missing_bucket_is_one_clear_error_naming_the_uri(s3_server):
    with pytest.raises(storage.StorageError) as err:
        storage.fetch("s3://no-such-bucket-here/weights.pth")
    message = str(err.value)
    assert message.startswith("s3://no-such-bucket-here/weights.pth:")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message and os.environ["AWS_ACCESS_KEY_ID"] not in message


def test_wrong_endpoint_fails_after_bounded_retries_with_a_hint(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    with pytest.raises(storage.StorageError, match="AWS_ENDPOINT_URL points at the S3 server"):
        storage.fetch("s3://somebucket/weights.pth")


def test_unsupported_scheme_and_missing_local_path_are_clear():
    with pytest.raises(storage.StorageError, match="unsupported scheme"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.fetch("/definitely/not/here.pth")
