"""Helpers shared by several test files (test files never import each other).

Running the real scripts as processes: `run`, the micro model and fast settings, the metrics log;
the loss oracles the model's training step is checked against; an S3 server on loopback."""

import json
import os
import re
import runpy
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
MICRO = ["--dim=32", "--n_layers=4", "--n_heads=2", "--n_future_tokens=3", "--multiple_of=16", "--max_seq_len=128"]
FAST = ["--device=cpu", "--batch_size=16", "--log_interval=1", "--max_length=96"]


def run(args, cwd=ROOT, expect=0, torchrun=False, env=None, nproc=2, timeout=600):
    """`python args...` (or torchrun with nproc CPU processes) in the repo root, one thread per
    process; asserts the exit code and returns the CompletedProcess."""
    cmd = ([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if torchrun else [PY]) + list(args)
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)
    assert p.returncode == expect, f"exit {p.returncode}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-3000:]}"
    return p


def prepare_arith(out_dir, n_train=300, n_val=40, n_test=40, seed=3):
    """A small embedded arith dataset in out_dir (its own tokenizer); returns out_dir as a str."""
    run(["data/arith/prepare.py", f"--out_dir={out_dir}", f"--n_train_problems={n_train}",
         f"--n_val_problems={n_val}", f"--n_test_problems={n_test}", f"--seed={seed}"])
    return str(out_dir)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir, key="train/loss"):
    return [m[key] for m in metrics(out_dir) if key in m]


def val_losses(out_dir):
    return [m["val/loss"] for m in metrics(out_dir) if "val/loss" in m]


def weighted_mtp_ce(ce, weights):
    """The weighted MTP loss written out over all heads' CE at once (the oracle the sequential
    training step is checked against): loss_k = sum_{b,t} w[b,t,k] ce[b,t,k] / count(w[:,:,k] > 0),
    loss = mean over heads. Targets with w = 0 contribute nothing even where ce is inf/NaN.
    ce (B, L, n), weights (B, L, n) -> (loss, head_losses (n,))"""
    ce, w = ce.float(), weights.to(ce.device).float()
    on = w > 0
    head_losses = torch.where(on, w * ce, 0.0).sum(dim=(0, 1)) / on.sum(dim=(0, 1)).clamp_min(1).float()
    return head_losses.mean(), head_losses


def weights_head_loss(weights):
    """A forward_backward head_loss from a (B, L, n) weight tensor: head k's weighted CE over its
    count of targets with w > 0 (the per-micro-batch form of the stages' losses)."""
    def head_loss(k, ce_k):
        w_k = weights[..., k].to(ce_k.dtype)
        return (w_k * ce_k).sum() / (w_k > 0).sum().clamp(min=1)
    return head_loss


def run_script(argv, monkeypatch):
    """python script argv..., in this process (a subprocess would spend seconds importing torch);
    argv[0] is the script, relative to the repo root. Returns the exit code."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", list(argv))
    try:
        runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def rss_bytes():
    """This process's resident memory now (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


# texts every tokenizer kind must round-trip
TEXTS = ["Compute: 3 + 4 * (12 - 5)\n= 3 + 28\nAnswer: 31", "def f(x):\n    return x * 2  # twice\n",
         "The quick brown fox jumps over the lazy dog.", "numbers 1234567890 and tabs\there"] * 20
SAMPLES = ["hello world", "Answer: -1234\n", "  leading and trailing  ", "multi\nline\n\ntext\n", "é ü 漢字 🙂",
           "<s></s><pad> <|begin_of_text|>", ""]



def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 in server mode on 127.0.0.1 (real HTTP: boto3 talks to it as to AWS, nothing is
    stubbed), in a thread of this process. stop() refuses connections until start() again on the
    same port. `requests` is its access log: (method, path, access key id, status) of every request,
    so clients given keys of their own (env(key)) can be told apart, e.g. two machines' downloads.
    moto keeps one store per process, across servers: reset() empties it."""

    def __init__(self):
        self.port = free_port()
        self.requests = []
        self.server = None
        self.start()

    def start(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server
        log = self.requests

        class Handler(MotoRequestHandler):
            def log_request(self, code="-", size="-"):  # werkzeug's access-log hook, one call per request
                key = re.search(r"Credential=([^/]+)/", self.headers.get("Authorization", ""))
                log.append((self.command, urllib.parse.urlsplit(self.path).path, key and key.group(1), int(code)))

        app = DomainDispatcherApplication(create_backend_app)
        self.server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()  # shutdown() leaves the socket listening
            self.thread.join()
            self.server = None

    def env(self, key="testing"):
        """boto3's settings for this server, with `key` as the access key id (moto accepts any)."""
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_MAX_ATTEMPTS": "1"}  # botocore's own retries off: S3Uploader retries

    def reset(self):
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{self.port}/moto-api/reset", method="POST"),
                               timeout=10)
        self.requests.clear()
