"""
Checkpoint upload to S3 (or any S3-compatible store) in a background thread, and download.

Endpoint, region and credentials come from boto3's standard configuration (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE, ~/.aws/config,
AWS_MAX_ATTEMPTS, ...), so MinIO, R2 or moto work by setting the usual variables. How long an
upload keeps trying is the uploader's own retry loop (WMTP_S3_MAX_RETRIES, default 5 retries;
WMTP_S3_BACKOFF, default 1.0 s, doubled after each failure: about 30 s of waiting per checkpoint).
Errors that a retry cannot heal (no credentials, access denied, no such bucket: PERMANENT_CODES)
give up at once. A training run whose checkpoints did not all reach S3 exits with code 3
(train_common.EXIT_S3_FAILED) after its report; the checkpoints are in out_dir.

Layout under s3://bucket/prefix/: one object per checkpoint (`prefix/name`) and `manifest.json`,
which lists only complete uploads and is written after them. A reader that follows the manifest
therefore never sees a half-uploaded checkpoint:

    {"version": 1, "latest": "ckpt_0000300.pt", "best": "ckpt_0000200.pt", "updated": 1700000000.0,
     "checkpoints": [{"name", "size", "sha256", "etag", "iter", "time", "is_best"}, ...]}

`latest` is the newest checkpoint submitted with latest=True (the one to resume from; a
weights-only final checkpoint is submitted with latest=False), `best` the newest submitted with
is_best=True. Entries are ordered oldest to newest. Retention keeps the newest `keep` entries plus
the best and the latest; objects leave the bucket only after a manifest without them has been
written, and only objects that an earlier manifest listed are ever deleted (nothing else under
the prefix is touched).
Use a new name for each checkpoint (e.g. ckpt_000100.pt): re-uploading a name replaces its entry,
but while the new object is on its way the manifest still describes the old one.
"""

import hashlib
import json
import os
import queue
import re
import shutil
import socket
import threading
import time

import boto3
from boto3.s3.transfer import TransferConfig

MULTIPART_CHUNKSIZE = 64 * 1024 * 1024  # bytes; files above this go up in parts of this size
MANIFEST = "manifest.json"


def parse_s3_uri(uri):
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix'). The prefix may be empty
    ('s3://bucket' keeps the checkpoints and the manifest at the bucket's root)."""
    m = re.fullmatch(r"s3://([^/\s]+)/*(.*?)/*", uri or "")
    if m is None:
        raise ValueError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    return m.group(1), m.group(2)


def _key(prefix, name):
    return f"{prefix}/{name}" if prefix else name


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


def _one_line(e):
    msg = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {msg}"


def _transfer_config():
    return TransferConfig(multipart_threshold=MULTIPART_CHUNKSIZE,
                          multipart_chunksize=MULTIPART_CHUNKSIZE, max_concurrency=4)


def _is_missing(e):
    code = getattr(e, "response", {}).get("Error", {}).get("Code")
    return code in ("NoSuchKey", "404", "NotFound")


# error codes that retrying cannot heal: credentials, permissions, the bucket itself
PERMANENT_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId",
                   "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "NoSuchBucket", "InvalidBucketName",
                   "PermanentRedirect", "AuthorizationHeaderMalformed"}


def _cannot_heal(e):
    """True for an error that a retry would only repeat: no or wrong credentials, access denied, no
    such bucket. boto3 wraps a client error in S3UploadFailedError, so the exception chain is searched."""
    from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError, PartialCredentialsError
    while e is not None:
        if isinstance(e, (NoCredentialsError, PartialCredentialsError, ParamValidationError)):
            return True
        if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in PERMANENT_CODES:
            return True
        e = e.__cause__ or e.__context__
    return False


class S3Uploader:
    """Uploads checkpoints in one background thread; submit() never blocks on the network and
    nothing here raises into the training loop: a failed upload is retried with exponential
    backoff, then reported and skipped, and training goes on. Rank 0 only.

        up = S3Uploader("s3://bucket/run1", keep=3)
        up.submit("out/ckpt.pt", "ckpt_000100.pt", is_best=True)
        ...
        not_uploaded = up.close(timeout=600)    # before exit
    """

    def __init__(self, s3_uri, keep=3, max_retries=None, backoff=None):
        self.bucket, self.prefix = parse_s3_uri(s3_uri)
        if max_retries is None:
            max_retries = int(os.environ.get("WMTP_S3_MAX_RETRIES", 5))
        if backoff is None:
            backoff = float(os.environ.get("WMTP_S3_BACKOFF", 1.0))
        if keep < 1:
            raise ValueError(f"s3 keep must be >= 1, got {keep}")
        self.uri = s3_uri
        self.keep, self.max_retries, self.backoff = keep, max_retries, backoff
        self.client = boto3.client("s3")
        self.failed = []       # names given up on, in order
        self.uploaded = []     # names that reached the manifest, in order
        self._waiting = []     # names submitted and not finished yet
        self._manifest = None  # read from S3 on first use (a resumed run appends to it)
        self._to_delete = []   # keys dropped from the manifest whose delete has not succeeded yet
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self._closed = False
        self._seq = 0
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._worker, name="s3-uploader", daemon=True)
        self._thread.start()

    # -- called from the training thread ------------------------------------------------------

    def submit(self, local_path, name, is_best=False, iter_num=None, latest=True):
        """Queue `local_path` for upload as `prefix/name`. The file is hard-linked (or copied) to a
        staging name first, so the caller may overwrite `local_path` right away. `iter_num`
        goes into the manifest (default: the last number in `name`, if any). latest=False keeps
        the manifest's `latest` where it was (for a file that is not a resumable checkpoint)."""
        if iter_num is None:
            digits = re.findall(r"\d+", name)
            iter_num = int(digits[-1]) if digits else None
        if self._closed or not os.path.isfile(local_path):
            self._give_up(name, "uploader already closed" if self._closed else f"no such file {local_path}")
            return
        self._seq += 1
        staged = os.path.join(os.path.dirname(os.path.abspath(local_path)),
                              f".{os.path.basename(name)}.upload.tmp.{os.getpid()}.{self._seq}")
        try:
            try:
                os.link(local_path, staged)
            except OSError:
                shutil.copyfile(local_path, staged)  # filesystems without hard links
        except Exception as e:
            self._give_up(name, _one_line(e))
            return
        with self._lock:
            self._waiting.append(name)
        self._queue.put((staged, name, bool(is_best), iter_num, bool(latest)))

    def pending(self):
        """Number of submitted checkpoints not uploaded (or given up on) yet."""
        with self._lock:
            return len(self._waiting)

    def close(self, timeout=600):
        """Wait up to `timeout` seconds for pending uploads; return the names that did not
        upload (given up on, or still pending at the deadline) and print a report."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abort.set()  # the worker skips what is left; an upload in progress is dropped at exit
        with self._lock:  # a name may briefly be in both lists while the worker gives up on it
            not_uploaded = list(dict.fromkeys(self.failed + self._waiting))
        if not_uploaded:
            print(f"s3: {len(not_uploaded)} checkpoint(s) NOT uploaded to {self.uri}: "
                  f"{', '.join(not_uploaded)}", flush=True)
        elif self.uploaded:
            print(f"s3: all {len(self.uploaded)} checkpoint(s) uploaded to {self.uri}", flush=True)
        return not_uploaded

    # -- background thread --------------------------------------------------------------------

    def _give_up(self, name, why):
        if not self._abort.is_set():  # after close() timed out, its report already names it
            print(f"s3: giving up on {name} ({why}); training continues", flush=True)
        with self._lock:
            self.failed.append(name)

    def _worker(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            staged, name, is_best, iter_num, latest = item
            try:
                if self._abort.is_set():
                    self._give_up(name, "uploader closed before the upload finished")
                else:
                    self._upload(staged, name, is_best, iter_num, latest)
            except Exception as e:  # a bug here must not kill the thread and hang close()
                self._give_up(name, _one_line(e))
            finally:
                try:
                    os.remove(staged)
                except OSError:
                    pass
                with self._lock:
                    self._waiting.remove(name)

    def _retry(self, what, fn):
        """fn() with up to max_retries retries and exponential backoff; re-raises the last error, and
        at once an error that cannot heal (no credentials, access denied, no such bucket, ...)."""
        for attempt in range(self.max_retries + 1):
            try:
                return fn()
            except Exception as e:
                if attempt == self.max_retries or self._abort.is_set() or _cannot_heal(e):
                    raise
                delay = self.backoff * 2 ** attempt
                print(f"s3: {what} failed ({_one_line(e)}); retry {attempt + 1}/"
                      f"{self.max_retries} in {delay:.1f}s", flush=True)
                self._abort.wait(delay)

    def _read_manifest(self):
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=_key(self.prefix, MANIFEST))["Body"]
        except Exception as e:
            if _is_missing(e):
                return {"version": 1, "latest": None, "best": None, "checkpoints": []}
            raise
        try:
            return json.loads(body.read())
        except ValueError:
            print(f"s3: warning: unreadable {MANIFEST} in {self.uri}; starting a new one", flush=True)
            return {"version": 1, "latest": None, "best": None, "checkpoints": []}

    def _upload(self, staged, name, is_best, iter_num, latest=True):
        key = _key(self.prefix, name)
        size = os.path.getsize(staged)
        sha = _sha256(staged)

        def put():
            self.client.upload_file(staged, self.bucket, key, Config=_transfer_config())
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            if head["ContentLength"] != size:
                raise IOError(f"uploaded size {head['ContentLength']} != local size {size}")
            return head.get("ETag", "").strip('"')

        try:
            etag = self._retry(f"upload of {name}", put)
            if self._manifest is None:
                self._manifest = self._retry(f"read of {MANIFEST}", self._read_manifest)
        except Exception as e:
            self._give_up(name, _one_line(e) + ("; cannot heal, not retried" if _cannot_heal(e) else ""))
            return

        entries = [c for c in self._manifest["checkpoints"] if c["name"] != name]
        entries.append({"name": name, "size": size, "sha256": sha, "etag": etag, "iter": iter_num,
                        "time": time.time(), "is_best": is_best})
        best = name if is_best else self._manifest.get("best")
        newest = name if latest else self._manifest.get("latest")
        names = [c["name"] for c in entries]
        best = best if best in names else None
        newest = newest if newest in names else None
        kept = [c for i, c in enumerate(entries) if i >= len(entries) - self.keep or c["name"] in (best, newest)]
        for c in kept:
            c["is_best"] = c["name"] == best
        manifest = {"version": 1, "latest": newest, "best": best, "updated": time.time(),
                    "checkpoints": kept}

        def write():
            self.client.put_object(Bucket=self.bucket, Key=_key(self.prefix, MANIFEST),
                                   Body=json.dumps(manifest, indent=1).encode(),
                                   ContentType="application/json")
        try:
            self._retry(f"write of {MANIFEST}", write)
        except Exception as e:
            self._give_up(name, f"uploaded but {MANIFEST} not written: {_one_line(e)}"
                                + ("; cannot heal, not retried" if _cannot_heal(e) else ""))
            return
        self._manifest = manifest
        with self._lock:
            self.uploaded.append(name)
        print(f"s3: uploaded {name} ({size / 1e6:.1f} MB) to {self.uri}", flush=True)

        # retention: delete only after the manifest no longer lists them
        kept_names = {c["name"] for c in kept}
        self._to_delete += [_key(self.prefix, c["name"]) for c in entries
                            if c["name"] not in kept_names]
        listed = {_key(self.prefix, n) for n in kept_names}
        self._to_delete = [k for k in self._to_delete if k not in listed]  # re-uploaded since
        for k in list(self._to_delete):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=k)
                self._to_delete.remove(k)
            except Exception as e:
                print(f"s3: warning: could not delete old checkpoint {k} ({_one_line(e)}); "
                      f"will retry after the next upload", flush=True)


def download_checkpoint(s3_uri, dest_dir, which="latest", filename=None):
    """Download the manifest's `latest` (or `best`, or a named) checkpoint into dest_dir, as
    `filename` (default: its name in the bucket), and return its local path. The file appears
    atomically and is checked against the manifest's size and sha256; an existing identical file
    is reused. Several machines may download into one shared folder at once: each writes its own
    temp file (host name and pid in its name) and the identical results replace each other."""
    bucket, prefix = parse_s3_uri(s3_uri)
    client = boto3.client("s3")
    manifest_uri = f"s3://{bucket}/{_key(prefix, MANIFEST)}"
    try:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=_key(prefix, MANIFEST))["Body"].read())
    except Exception as e:
        if _is_missing(e):
            raise FileNotFoundError(f"no checkpoint manifest at {manifest_uri}") from None
        raise RuntimeError(f"cannot read {manifest_uri}: {_one_line(e)}") from None
    name = manifest.get(which) if which in ("latest", "best") else which
    entry = next((c for c in manifest.get("checkpoints", []) if c["name"] == name), None)
    if entry is None:
        raise FileNotFoundError(f"no {which!r} checkpoint listed in {manifest_uri}")

    os.makedirs(dest_dir, exist_ok=True)
    path = os.path.join(dest_dir, filename or name)
    if os.path.isfile(path) and os.path.getsize(path) == entry["size"] and _sha256(path) == entry["sha256"]:
        return path
    tmp = os.path.join(dest_dir, f".{os.path.basename(path)}.tmp.{socket.gethostname()}.{os.getpid()}")
    src = f"s3://{bucket}/{_key(prefix, name)}"
    try:
        client.download_file(bucket, _key(prefix, name), tmp, Config=_transfer_config())
        size, sha = os.path.getsize(tmp), _sha256(tmp)
        if size != entry["size"] or sha != entry["sha256"]:
            raise ValueError(f"downloaded {src} does not match its manifest entry "
                             f"(size {size} vs {entry['size']}, sha256 {sha[:12]} vs {entry['sha256'][:12]})")
        os.replace(tmp, path)
    except ValueError:
        raise
    except Exception as e:
        raise RuntimeError(f"cannot download {src}: {_one_line(e)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"s3: downloaded {src} ({entry['size'] / 1e6:.1f} MB) to {path}", flush=True)
    return path
