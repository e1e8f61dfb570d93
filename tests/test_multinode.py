"""Several machines, proven on one host: two torchrun agents (--nnodes=2 --nproc_per_node=2, c10d
rendezvous on 127.0.0.1) are the two machines, each in its own working directory with its own
out_dir and its own prepared data (no shared disk); the S3 server on loopback is the only storage
they share. Each machine has an S3 access key of its own, so the server's access log tells their
requests apart. The single-machine runs they are compared with are `torchrun --standalone
--nproc_per_node=4`: the same 4 ranks, the same data shards.

torchrun ignores --node_rank under c10d: the rendezvous decides which machine holds RANK 0 (it sorts
the agents by host name, here by pid), so the tests find it (the machine that wrote out_dir) rather
than assume it. Cost: every launch is 2 agents + 4 ranks, each importing torch.
"""

import os
import re
import subprocess
from types import SimpleNamespace

import boto3
import pytest
import torch

from tests.helpers import MICRO, ROOT, TORCHRUN, S3Server, free_port, metrics, prepare_arith, run

pytestmark = pytest.mark.slow

BUCKET = "wmtp-multinode"
COMMON = ["--device=cpu", "--batch_size=4", "--log_interval=1", "--max_length=96", "--eval_interval=2"]
TIMING = ("tokens_per_s", "mfu", "mem_gb")  # the only logged values allowed to differ between runs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The S3 server with an empty bucket, and two machines: folders m0 and m1, each with the data
    prepared on it (the same command: byte-identical files)."""
    server = S3Server()
    server.reset()
    env = server.env()
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    root = tmp_path_factory.mktemp("multinode")
    machines = []
    for i in (0, 1):
        prepare_arith(root / f"m{i}" / "data", n_train=60, n_val=13, n_test=5, seed=5)
        machines.append(str(root / f"m{i}"))
    yield SimpleNamespace(server=server, root=str(root), machines=machines)
    server.stop()


def launch(cluster, script, name, *args, expect=0, out_dirs=None):
    """`script` on the two machines at once: machine i runs torchrun in its folder, with its data,
    out_dir <folder>/<name> (or out_dirs[i]) and access key 'machine<i>'. Returns, per machine, the
    access log's requests made during the run and the agent's stdout and stderr."""
    port, first = free_port(), len(cluster.server.requests)
    procs = []
    for i, m in enumerate(cluster.machines):
        out_dir = out_dirs[i] if out_dirs else os.path.join(m, name)
        cmd = [TORCHRUN, "--nnodes=2", "--nproc_per_node=2", f"--node_rank={i}", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={name}", os.path.join(ROOT, script),
               f"--data_dir={m}/data", f"--out_dir={out_dir}", *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", **cluster.server.env(f"machine{i}"))
        log = os.path.join(m, name)
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            procs.append((subprocess.Popen(cmd, cwd=m, env=env, stdout=out, stderr=err), log))
    try:
        for p, _ in procs:
            p.wait(timeout=300)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for i, (p, log) in enumerate(procs):
        out, err = open(f"{log}.out").read(), open(f"{log}.err").read()
        assert p.returncode == expect, f"machine {i}: exit {p.returncode}\nSTDOUT\n{out[-3000:]}\nSTDERR\n{err[-3000:]}"
        requests = [r for r in cluster.server.requests[first:] if r[2] == f"machine{i}"]
        results.append(SimpleNamespace(out=out, err=err, requests=requests))
    return results


def writer(cluster, name):
    """The one machine whose out_dir <folder>/<name> holds the run's log: the one that held RANK 0."""
    found = [i for i, m in enumerate(cluster.machines) if os.path.exists(os.path.join(m, name, "metrics.jsonl"))]
    assert len(found) == 1, found
    return found[0]


def records(out_dir):
    """The run's log without its timings: what two runs of the same training must share exactly."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(out_dir)]


def train_iters(out_dir):
    return [r["iter"] for r in metrics(out_dir) if "lr" in r]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def gets(requests, key):
    """How many times these requests downloaded s3://BUCKET/key (GETs answered 200)."""
    return sum(1 for method, path, _, code in requests if method == "GET" and path == f"/{BUCKET}/{key}" and code == 200)


@pytest.fixture(scope="module")
def stage0(cluster):
    """Stage 0 from scratch for 2 steps on the two machines, checkpoints to s3://.../stage0."""
    results = launch(cluster, "train_baseline.py", "stage0", "--max_iters=2", f"--s3_uri=s3://{BUCKET}/stage0",
                     *MICRO, *COMMON)
    return results, writer(cluster, "stage0")


def test_stage0_only_rank0_writes_and_uploads(cluster, stage0):
    """Stage 0 under DDP over the 4 ranks of two machines: RANK 0's machine writes out_dir and
    uploads; the other one writes nothing and never talks to S3."""
    results, w = stage0
    other = 1 - w
    out = os.path.join(cluster.machines[w], "stage0")
    assert "baseline: " in results[w].out and "4 rank(s) on cpu" in results[w].out  # RANK 0's line
    assert "baseline: " not in results[other].out
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt.pt", "final.pt", "metrics.jsonl"]
    assert not os.path.exists(os.path.join(cluster.machines[other], "stage0"))  # nothing written there
    assert train_iters(out) == [1, 2]
    assert len(torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["rng"]) == 4  # every rank's RNG
    # uploads: only from RANK 0's machine; the other one never talked to S3
    puts = sorted(path for method, path, _, code in results[w].requests if method == "PUT" and code == 200)
    assert puts == [f"/{BUCKET}/stage0/{n}" for n in ("ckpt_0000002.pt", "final_0000002.pt", "manifest.json",
                                                       "manifest.json")]
    assert results[other].requests == []


@pytest.fixture(scope="module")
def stage0_resumed(cluster, stage0):
    """Both machines resume stage 0 from S3 and train 2 more steps (to iteration 4)."""
    results = launch(cluster, "train_baseline.py", "resumed", f"--init_from=s3://{BUCKET}/stage0", "--max_iters=4",
                     f"--s3_uri=s3://{BUCKET}/stage0", *COMMON)
    return results, writer(cluster, "resumed")


@pytest.fixture(scope="module")
def one_machine0(cluster):
    """Stage 0 from scratch to iteration 4 without a break, on one machine with 4 ranks."""
    out = os.path.join(cluster.root, "one_machine0")
    run(["train_baseline.py", f"--data_dir={cluster.machines[0]}/data", f"--out_dir={out}", "--max_iters=4", *MICRO,
         *COMMON], torchrun=True, nproc=4)
    return out


def test_resume_from_s3_downloads_once_per_machine_and_continues_exactly(cluster, stage0, stage0_resumed,
                                                                         one_machine0):
    (_, w0), (results, w) = stage0, stage0_resumed
    key = "stage0/ckpt_0000002.pt"
    assert [gets(r.requests, key) for r in results] == [1, 1]  # one download per machine, by its local rank 0
    ckpt2 = open(os.path.join(cluster.machines[w0], "stage0", "ckpt.pt"), "rb").read()  # what RANK 0 uploaded
    for m in cluster.machines:  # each machine's copy on its own disk
        assert open(os.path.join(m, "resumed", "s3_init.pt"), "rb").read() == ckpt2
    assert os.listdir(os.path.join(cluster.machines[1 - w], "resumed")) == ["s3_init.pt"]  # nothing else there
    # iterations 1-2 on two machines, 3-4 resumed on two machines == 1-4 in one go on one machine, bit for bit
    first = records(os.path.join(cluster.machines[w0], "stage0"))
    second = records(os.path.join(cluster.machines[w], "resumed"))
    assert [r["iter"] for r in second if "lr" in r] == [3, 4]
    assert first + second == records(one_machine0)
    assert_same_weights(os.path.join(cluster.machines[w], "resumed", "final.pt"),
                        os.path.join(one_machine0, "final.pt"))
    # the resumed run went on uploading into the same manifest
    puts = [path for method, path, _, code in results[w].requests if method == "PUT" and code == 200]
    assert f"/{BUCKET}/stage0/ckpt_0000004.pt" in puts
    assert not any(method == "PUT" for method, *_ in results[1 - w].requests)


@pytest.fixture(scope="module")
def critic_on_s3(cluster, stage0):
    """A critic (stage 1, one process) from stage 0's S3 checkpoint, uploaded to s3://.../critic."""
    out = os.path.join(cluster.root, "critic")
    run(["train_critic.py", f"--data_dir={cluster.machines[0]}/data", f"--out_dir={out}",
         f"--init_from=s3://{BUCKET}/stage0", "--max_iters=2", f"--s3_uri=s3://{BUCKET}/critic", *COMMON],
        env=cluster.server.env("critic"))
    return out


def test_stage2_from_an_s3_critic_on_two_machines_equals_one_machine(cluster, stage0, critic_on_s3):
    """Another stage's S3 checkpoint starts a new run from its weights (iterations from 1), on each
    machine from its own download, exactly as on one machine."""
    assert train_iters(critic_on_s3) == [1, 2]  # stage 0's: weights only
    args = [f"--init_from=s3://{BUCKET}/critic", "--max_iters=2", *COMMON]
    results = launch(cluster, "train_verifiable.py", "stage2", *args)
    w = writer(cluster, "stage2")
    assert [gets(r.requests, "critic/ckpt_0000002.pt") for r in results] == [1, 1]
    one = os.path.join(cluster.root, "one_machine2")
    run(["train_verifiable.py", f"--data_dir={cluster.machines[0]}/data", f"--out_dir={one}", *args], torchrun=True,
        nproc=4, env=cluster.server.env("one_machine"))
    one_machine = [r for r in cluster.server.requests if r[2] == "one_machine"]
    assert gets(one_machine, "critic/ckpt_0000002.pt") == 1  # 4 ranks, 1 download
    two = os.path.join(cluster.machines[w], "stage2")
    assert train_iters(two) == [1, 2]
    assert "train/value_mse" in metrics(two)[0]
    assert records(two) == records(one)
    assert_same_weights(os.path.join(two, "final.pt"), os.path.join(one, "final.pt"))


def test_fsdp_on_two_machines_without_a_shared_out_dir_is_refused_at_start(cluster):
    """fsdp=True: every rank writes its shards of the optimizer state (DCP) into out_dir, and
    init_from='resume' reads out_dir/ckpt.pt on every machine. Without a shared out_dir both are
    refused before any work: one line on each machine saying what to mount, exit 2, nothing left in
    either out_dir."""
    results = launch(cluster, "train_baseline.py", "fsdp", "--fsdp=True", "--init_from=resume", "--max_iters=2",
                     *COMMON, expect=1)
    line = ("train_baseline.py: error: on 2 machines: fsdp=True writes every rank's shards of the optimizer state to "
            "out_dir/ckpt_dcp/, but 1 machine(s) do not see rank 0's out_dir {}; init_from='resume' reads "
            "out_dir/ckpt.pt on every machine, but 2 machine(s) have none: give as out_dir a folder on storage that "
            "every machine mounts at the same path (NFS, Lustre, ...)")
    said = set()
    for r in results:
        errors = [x for x in r.err.splitlines() if x.startswith("train_baseline.py: error:")]
        assert len(errors) == 1, errors
        said.add(errors[0])
        repo_frames = [line for line in r.err.splitlines()  # no traceback from the repo's code (the venv may be in it)
                       if line.strip().startswith(f'File "{ROOT}/') and f'File "{ROOT}/.venv/' not in line]
        assert repo_frames == []
        assert not re.search(r"^iter \d", r.out, re.M)  # no step taken
    assert len(said) == 1 and said < {line.format(os.path.join(m, "fsdp")) for m in cluster.machines}  # RANK 0's
    # torchrun's failure report names the ranks' exit code, 2 (bad input); the agent that held the rendezvous
    # store always prints it, the other one may instead lose the store first (RendezvousConnectionError)
    assert any(re.search(r"exitcode\s+: 2 ", r.err) for r in results)
    assert not any(os.path.exists(os.path.join(m, "fsdp")) for m in cluster.machines)


def test_fsdp_on_two_machines_with_a_shared_out_dir_resumes_from_s3(cluster, stage0_resumed):
    """With one out_dir for both machines (what a shared mount gives) FSDP runs: stage 0's latest
    S3 checkpoint (iteration 4, DDP's whole optimizer state) continues sharded over the 4 ranks of
    the two machines, both downloading into the one folder, and the DCP folder holds all 4 shards."""
    shared = os.path.join(cluster.root, "shared_fsdp")
    results = launch(cluster, "train_baseline.py", "fsdp_shared", "--fsdp=True", f"--init_from=s3://{BUCKET}/stage0",
                     "--max_iters=6", *COMMON, out_dirs=[shared, shared])
    downloads = [gets(r.requests, "stage0/ckpt_0000004.pt") for r in results]
    assert max(downloads) == 1 <= sum(downloads)  # the second machine may find the first one's file, identical
    assert train_iters(shared) == [5, 6]
    ckpt = torch.load(os.path.join(shared, "ckpt.pt"), weights_only=True)
    assert ckpt["iter"] == 6 and ckpt["optimizer"] is None and ckpt["dcp"] == os.path.join("ckpt_dcp", "0000006")
    assert sorted(os.listdir(os.path.join(shared, "ckpt_dcp", "0000006"))) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    assert sorted(os.listdir(shared)) == ["best.pt", "ckpt.pt", "ckpt_dcp", "final.pt", "metrics.jsonl", "s3_init.pt"]
