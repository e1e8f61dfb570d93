"""s3.py against a real S3 server on loopback (moto's server mode, over HTTP; no stubbed client):
upload and manifest, manifest-after-object ordering, retention, download, and uploads that fail
while the server is down without ever raising into the training thread."""

import hashlib
import io
import json
import os
import time

import boto3
import pytest
import torch

import s3
from ddp_utils import load_weights, save_checkpoint
from s3 import S3Uploader, download_checkpoint, parse_s3_uri
from tests.helpers import S3Server

BUCKET = "wmtp-test"


@pytest.fixture
def server(monkeypatch):
    srv = S3Server()
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    srv.reset()  # start every test from an empty store
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield srv, client
    srv.stop()


def make_ckpt(path, i, n=1000):
    save_checkpoint(str(path), {"iter": i, "x": torch.full((n,), float(i))})
    return str(path)


def wait(cond, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    raise AssertionError("timed out")


def manifest(client, prefix="run1"):
    key = f"{prefix}/manifest.json" if prefix else "manifest.json"
    return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def keys(client, prefix="run1"):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def test_parse_s3_uri():
    assert parse_s3_uri("s3://bucket/a/b") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    assert parse_s3_uri("s3://bucket/") == ("bucket", "")
    for bad in ["bucket/a", "s3:/bucket/a", "s3://", "s3:///a", "https://bucket/a", "", None]:
        with pytest.raises(ValueError, match="not an S3 URI: .*expected s3://bucket/prefix"):
            parse_s3_uri(bad)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        S3Uploader("s3://b/p", keep=0)


def test_upload_manifest_and_download(server, tmp_path):
    _, client = server
    up = S3Uploader(f"s3://{BUCKET}/run1", keep=3, max_retries=1, backoff=0.05)
    local = tmp_path / "ckpt.pt"
    make_ckpt(local, 100)
    up.submit(str(local), "ckpt_000100.pt", is_best=True)
    make_ckpt(local, 200)  # overwriting right after submit must not change what is uploaded
    up.submit(str(local), "ckpt_000200.pt")
    assert up.close(timeout=60) == [] and up.pending() == 0
    assert [p for p in os.listdir(tmp_path) if ".upload.tmp." in p] == []  # staging links removed

    m = manifest(client)
    assert (m["latest"], m["best"]) == ("ckpt_000200.pt", "ckpt_000100.pt")
    assert [(c["name"], c["iter"], c["is_best"]) for c in m["checkpoints"]] == [
        ("ckpt_000100.pt", 100, True), ("ckpt_000200.pt", 200, False)]
    for c in m["checkpoints"]:
        body = client.get_object(Bucket=BUCKET, Key=f"run1/{c['name']}")["Body"].read()
        assert c["size"] == len(body) and c["sha256"] == hashlib.sha256(body).hexdigest()
        assert torch.load(io.BytesIO(body), weights_only=False)["iter"] == c["iter"]

    path = download_checkpoint(f"s3://{BUCKET}/run1", str(tmp_path / "dl"))
    assert path == str(tmp_path / "dl" / "ckpt_000200.pt")
    assert load_weights(path)["iter"] == 200
    assert os.listdir(tmp_path / "dl") == ["ckpt_000200.pt"]
    best = download_checkpoint(f"s3://{BUCKET}/run1", str(tmp_path / "dl"), which="best")
    assert load_weights(best)["iter"] == 100

    # a corrupted object is caught by the manifest's sha256 and leaves no file behind
    client.put_object(Bucket=BUCKET, Key="run1/ckpt_000200.pt", Body=b"x" * m["checkpoints"][1]["size"])
    with pytest.raises(ValueError, match="ckpt_000200.pt does not match its manifest entry"):
        download_checkpoint(f"s3://{BUCKET}/run1", str(tmp_path / "dl2"))
    assert os.listdir(tmp_path / "dl2") == []
    with pytest.raises(FileNotFoundError, match=f"no checkpoint manifest at s3://{BUCKET}/nothing/manifest.json"):
        download_checkpoint(f"s3://{BUCKET}/nothing", str(tmp_path / "dl3"))


def test_multipart_object_complete_before_manifest(server, tmp_path, monkeypatch):
    """Every request is recorded: the manifest is written only after the checkpoint's multipart
    upload completed; a checkpoint whose upload dies half-way never enters the manifest."""
    _, client = server
    monkeypatch.setattr(s3, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)  # S3's smallest part size
    up = S3Uploader(f"s3://{BUCKET}/run1", keep=3, max_retries=1, backoff=0.05)
    calls = []
    up.client.meta.events.register("before-parameter-build.s3", lambda model, params, **kw: calls.append(
        (model.name, params.get("Key"), params.get("PartNumber"))))

    failed_parts = []

    def fail_second_part(model, params, **kw):  # the network dies in the middle of ckpt_2.pt
        if params.get("Key") == "run1/ckpt_2.pt" and params.get("PartNumber") == 2:
            failed_parts.append(params["Key"])  # recorded here: parts 1 and 3 may be cancelled before they start
            raise ConnectionError("connection reset mid-upload")
    up.client.meta.events.register("before-parameter-build.s3.UploadPart", fail_second_part)

    local = tmp_path / "ckpt.pt"
    for i in (1, 2):
        make_ckpt(local, i, n=3_000_000)  # 12 MB: 3 parts
        up.submit(str(local), f"ckpt_{i}.pt")
    assert up.close(timeout=60) == ["ckpt_2.pt"]

    ops = [(op, key) for op, key, _ in calls]
    complete = ops.index(("CompleteMultipartUpload", "run1/ckpt_1.pt"))
    put_manifest = ops.index(("PutObject", "run1/manifest.json"))
    assert complete < put_manifest
    assert ops.count(("PutObject", "run1/manifest.json")) == 1  # nothing written for ckpt_2.pt
    assert failed_parts == ["run1/ckpt_2.pt"] * 2  # the first attempt and its one retry
    assert ("CompleteMultipartUpload", "run1/ckpt_2.pt") not in ops
    m = manifest(client)
    assert m["latest"] == "ckpt_1.pt" and [c["name"] for c in m["checkpoints"]] == ["ckpt_1.pt"]
    assert keys(client) == ["run1/ckpt_1.pt", "run1/manifest.json"]


def test_retention_keeps_newest_and_best(server, tmp_path):
    _, client = server
    # a resumed run appends to what an earlier uploader left in the manifest
    up = S3Uploader(f"s3://{BUCKET}/run1", keep=2, max_retries=1, backoff=0.05)
    local = tmp_path / "ckpt.pt"
    for i in (1, 2):
        up.submit(make_ckpt(local, i), f"ckpt_{i}.pt", is_best=i == 2)
    assert up.close(timeout=60) == []
    up = S3Uploader(f"s3://{BUCKET}/run1", keep=2, max_retries=1, backoff=0.05)
    for i in (3, 4, 5):
        up.submit(make_ckpt(local, i), f"ckpt_{i}.pt")
        wait(lambda: up.pending() == 0)
    m = manifest(client)
    assert [c["name"] for c in m["checkpoints"]] == ["ckpt_2.pt", "ckpt_4.pt", "ckpt_5.pt"]
    assert (m["latest"], m["best"]) == ("ckpt_5.pt", "ckpt_2.pt")
    assert keys(client) == ["run1/ckpt_2.pt", "run1/ckpt_4.pt", "run1/ckpt_5.pt", "run1/manifest.json"]

    up.submit(make_ckpt(local, 6), "ckpt_6.pt", is_best=True)  # a new best: the old one may go
    assert up.close(timeout=60) == []
    m = manifest(client)
    assert [(c["name"], c["is_best"]) for c in m["checkpoints"]] == [("ckpt_5.pt", False), ("ckpt_6.pt", True)]
    assert (m["latest"], m["best"]) == ("ckpt_6.pt", "ckpt_6.pt")
    assert keys(client) == ["run1/ckpt_5.pt", "run1/ckpt_6.pt", "run1/manifest.json"]


def test_latest_false_keeps_the_resume_point(server, tmp_path):
    """A weights-only file (final.pt) goes up with latest=False: `latest` stays on the newest
    resumable checkpoint, and retention never drops it, even with keep=1."""
    _, client = server
    up = S3Uploader(f"s3://{BUCKET}/run1", keep=1, max_retries=1, backoff=0.05)
    local = tmp_path / "ckpt.pt"
    up.submit(make_ckpt(local, 1), "ckpt_1.pt", is_best=True)
    up.submit(make_ckpt(local, 2), "ckpt_2.pt")
    up.submit(make_ckpt(local, 2), "final_2.pt", latest=False)
    assert up.close(timeout=60) == []
    m = manifest(client)
    assert (m["latest"], m["best"]) == ("ckpt_2.pt", "ckpt_1.pt")
    assert [c["name"] for c in m["checkpoints"]] == ["ckpt_1.pt", "ckpt_2.pt", "final_2.pt"]
    assert download_checkpoint(f"s3://{BUCKET}/run1", str(tmp_path / "dl")).endswith("ckpt_2.pt")


def test_empty_prefix_and_unrelated_objects_untouched(server, tmp_path):
    _, client = server
    client.put_object(Bucket=BUCKET, Key="notes.txt", Body=b"not ours")
    up = S3Uploader(f"s3://{BUCKET}", keep=1, max_retries=1, backoff=0.05)
    local = tmp_path / "ckpt.pt"
    for i in (1, 2):
        up.submit(make_ckpt(local, i), f"ckpt_{i}.pt")
    assert up.close(timeout=60) == []
    assert manifest(client, prefix="")["latest"] == "ckpt_2.pt"
    assert keys(client, prefix="") == ["ckpt_2.pt", "manifest.json", "notes.txt"]


def test_server_down_then_back(server, tmp_path, capsys):
    srv, client = server
    up = S3Uploader(f"s3://{BUCKET}/run1", keep=3, max_retries=2, backoff=0.05)
    local = tmp_path / "ckpt.pt"
    up.submit(make_ckpt(local, 1), "ckpt_1.pt")
    wait(lambda: up.pending() == 0)
    srv.stop()
    up.submit(make_ckpt(local, 2), "ckpt_2.pt")  # retried, then given up; submit never raises
    wait(lambda: up.failed == ["ckpt_2.pt"])
    assert up.pending() == 0
    srv.start()
    up.submit(make_ckpt(local, 3), "ckpt_3.pt")
    assert up.close(timeout=60) == ["ckpt_2.pt"]
    out = capsys.readouterr().out
    assert "retry 2/2" in out and "s3: giving up on ckpt_2.pt" in out
    assert "s3: 1 checkpoint(s) NOT uploaded to s3://wmtp-test/run1: ckpt_2.pt" in out
    m = manifest(client)
    assert [c["name"] for c in m["checkpoints"]] == ["ckpt_1.pt", "ckpt_3.pt"] and m["latest"] == "ckpt_3.pt"
    assert keys(client) == ["run1/ckpt_1.pt", "run1/ckpt_3.pt", "run1/manifest.json"]


def test_close_timeout_reports_pending(server, tmp_path):
    srv, _ = server
    srv.stop()
    up = S3Uploader(f"s3://{BUCKET}/run1", keep=3, max_retries=5, backoff=5.0)  # would retry ~2.5 min
    local = tmp_path / "ckpt.pt"
    up.submit(make_ckpt(local, 1), "ckpt_1.pt")
    up.submit(make_ckpt(local, 2), "ckpt_2.pt")
    up.submit(str(tmp_path / "missing.pt"), "ckpt_3.pt")  # a bad path is reported, not raised
    assert up.pending() == 2
    t0 = time.monotonic()
    assert up.close(timeout=1.0) == ["ckpt_3.pt", "ckpt_1.pt", "ckpt_2.pt"]
    assert time.monotonic() - t0 < 3
    up._thread.join(timeout=10)  # the worker stops retrying once close() gave up on it
    assert not up._thread.is_alive()


def test_errors_that_cannot_heal_fail_fast(server, tmp_path, capsys, monkeypatch):
    """No such bucket, no credentials: each upload is given up after its first attempt (5 retries
    with a 5 s backoff would take ~2.5 min each for an error that can heal) and reported."""
    local = tmp_path / "ckpt.pt"
    t0 = time.monotonic()
    up = S3Uploader("s3://no-such-bucket/run1", keep=3, max_retries=5, backoff=5.0)
    up.submit(make_ckpt(local, 1), "ckpt_1.pt")
    up.submit(make_ckpt(local, 2), "ckpt_2.pt")
    assert up.close(timeout=60) == ["ckpt_1.pt", "ckpt_2.pt"]
    out = capsys.readouterr().out
    assert out.count("NoSuchBucket") == 2 and out.count("; cannot heal, not retried); training continues") == 2
    assert "s3: 2 checkpoint(s) NOT uploaded to s3://no-such-bucket/run1: ckpt_1.pt, ckpt_2.pt" in out

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup either
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a fresh process: no credentials cached
    up = S3Uploader(f"s3://{BUCKET}/run1", keep=3, max_retries=5, backoff=5.0)
    up.submit(make_ckpt(local, 3), "ckpt_3.pt")
    assert up.close(timeout=60) == ["ckpt_3.pt"]
    out = capsys.readouterr().out
    assert "NoCredentialsError: Unable to locate credentials; cannot heal, not retried" in out
    assert "retry 1/" not in out and time.monotonic() - t0 < 20


def test_which_errors_cannot_heal():
    """Credentials, permissions and the bucket itself: not retried. Throttling, server errors and the
    network: retried. boto3 wraps a client error of upload_file in S3UploadFailedError."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code):
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "PutObject")

    for code in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        assert s3._cannot_heal(client_error(code)), code
    assert s3._cannot_heal(NoCredentialsError())
    try:
        try:
            raise client_error("AccessDenied")
        except ClientError:
            raise S3UploadFailedError("Failed to upload ckpt.pt to b/k: AccessDenied")
    except S3UploadFailedError as e:
        assert s3._cannot_heal(e)
    for e in (client_error("SlowDown"), client_error("InternalError"), client_error("RequestTimeout"),
              EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ConnectionError("reset"), OSError("x")):
        assert not s3._cannot_heal(e), e
