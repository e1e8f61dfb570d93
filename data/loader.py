"""
Reading a prepared dataset (see data/format.py for the files), shared by every stage.

    meta = load_meta("data/arith")
    ds = TokenDataset("data/arith", "train", balance_correct=True, max_length=128)
    loader, sampler = make_loader(ds, batch_size=32, pad_id=meta["pad_id"], shuffle=True, seed=0,
                                  rank=ctx.rank, world_size=ctx.world_size)
    sampler.set_epoch(epoch)          # every epoch (a new shuffle, the same on every rank)
    sampler.set_skip(n)               # on resume: skip the first n samples of this rank's epoch
    for batch in loader: ...          # input_ids (B, L), loss_mask (B, L), reward (B,), ...
"""

import functools
import math
import os

import numpy as np
import torch

from data.format import read_meta_file


def load_meta(data_dir):
    """meta.json as a dict; meta["tokenizer"] is resolved to a usable path, meta["data_dir"] added."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: prepare the data first (e.g. python data/arith/prepare.py)")
    meta = read_meta_file(path)
    # a tokenizer stored inside the data dir is relative to it, so the folder can move (text-only data: None)
    tokenizer = meta["tokenizer"]
    if tokenizer and not os.path.isabs(tokenizer) and os.path.exists(os.path.join(data_dir, tokenizer)):
        meta["tokenizer"] = os.path.join(data_dir, meta["tokenizer"])
    meta["data_dir"] = data_dir
    return meta


def check_tokenizer(meta, tokenizer):
    """One-line ValueError when the data was tokenized with another tokenizer than `tokenizer`."""
    path = os.path.join(meta.get("data_dir", "."), "meta.json")
    if meta["tokenizer"] is None:
        raise ValueError(text_only_error(meta))
    for key, value in (("vocab_size", tokenizer.n_words), ("bos_id", tokenizer.bos_id),
                       ("eos_id", tokenizer.eos_id)):
        if meta[key] != value:
            raise ValueError(f"{path}: field '{key}' is {meta[key]} but tokenizer {getattr(tokenizer, 'path', '')} "
                             f"has {value}: the data was tokenized with another tokenizer")


def text_only_error(meta):
    return (f"{meta.get('data_dir', '.')} is a text-only dataset (prepared without --tokenizer, no token files): "
            f"prepare it again with --tokenizer=PATH to train on it")


def draw(pool, n, rng):
    """n rows from pool, without replacement until pool is used up, then again (oversampling)."""
    if n == 0:
        return pool[:0]
    perms = [rng.permutation(pool) for _ in range(math.ceil(n / len(pool)))]
    return np.concatenate(perms)[:n]


def select_rows(rows, labels, n_samples, balance_correct, correct_ratio, seed, where):
    """The rows a dataset serves (sorted; repeats when oversampled): deterministic in seed."""
    rng = np.random.default_rng(seed)
    if n_samples is not None and n_samples <= 0:
        raise ValueError(f"{where}: n_samples must be positive, got {n_samples}")
    if not balance_correct:
        return rows if n_samples is None else np.sort(draw(rows, n_samples, rng))
    if not 0.0 <= correct_ratio <= 1.0:
        raise ValueError(f"{where}: correct_ratio must be in [0, 1], got {correct_ratio}")
    correct, incorrect = rows[labels == 1], rows[labels == 0]
    n = n_samples
    if n is None:  # as many as possible without repeating a row
        if correct_ratio == 1.0:
            n = len(correct)
        elif correct_ratio == 0.0:
            n = len(incorrect)
        else:
            n = int(min(len(correct) / correct_ratio, len(incorrect) / (1.0 - correct_ratio)))
    n_correct = int(math.floor(n * correct_ratio + 0.5))
    n_incorrect = n - n_correct
    if (n_correct > 0 and len(correct) == 0) or (n_incorrect > 0 and len(incorrect) == 0):
        raise ValueError(f"{where}: cannot balance to correct_ratio={correct_ratio}: {len(correct)} correct and "
                         f"{len(incorrect)} incorrect rows")
    if n == 0:
        raise ValueError(f"{where}: balancing leaves no rows ({len(correct)} correct, {len(incorrect)} incorrect)")
    return np.sort(np.concatenate([draw(correct, n_correct, rng), draw(incorrect, n_incorrect, rng)]))


class TokenDataset(torch.utils.data.Dataset):
    """
    One split, memory-mapped. Sampling (deterministic in seed):
    - n_samples: serve this many rows (a random subset; rows repeat only when more are asked
      for than exist); None = all rows.
    - balance_correct: a correct_ratio share of the served rows are correct (total n_samples, or
      as many as possible without repeats when n_samples is None).
    - max_length: rows longer than this are truncated ("truncate": the completion is cut, the
      prompt kept; a row with no room for a single completion token is dropped) or dropped
      ("drop"). n_truncated / n_dropped count the split's rows, before sampling.
    A truncated row keeps its label (the reward of the whole completion).
    """

    def __init__(self, data_dir, split, n_samples=None, balance_correct=False, correct_ratio=0.5, seed=0,
                 max_length=None, overflow="truncate"):
        self.meta = load_meta(data_dir)
        self.data_dir, self.split = data_dir, split
        if self.meta["tokenizer"] is None:
            raise ValueError(text_only_error(self.meta))
        bin_path = os.path.join(data_dir, f"{split}.bin")
        idx_path = os.path.join(data_dir, f"{split}.idx.npy")
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found (splits in {data_dir}/meta.json: "
                                        f"{', '.join(self.meta['splits']) or 'none'})")
        try:
            idx = np.load(idx_path)  # (N, 5) int64: offset, prompt_len, length, label, problem
        except (ValueError, EOFError, OSError) as e:  # e.g. a truncated file
            raise ValueError(f"{idx_path}: not a readable index (truncated file?): {e}") from None
        if idx.ndim != 2 or idx.shape[1] != 5:
            raise ValueError(f"{idx_path}: expected an (N, 5) index, got shape {idx.shape}")
        if len(idx) == 0:
            raise ValueError(f"{idx_path}: split '{split}' is empty")
        size, itemsize = os.path.getsize(bin_path), np.dtype(self.meta["dtype"]).itemsize
        if size == 0:
            raise ValueError(f"{bin_path}: empty token file (split '{split}' has {len(idx)} rows in {idx_path})")
        if size % itemsize:
            raise ValueError(f"{bin_path}: {size} bytes is not a whole number of {self.meta['dtype']} tokens "
                             f"(truncated file?)")
        self.tokens = np.memmap(bin_path, dtype=self.meta["dtype"], mode="r")  # (total tokens,)
        fe_path = os.path.join(data_dir, f"{split}.first_error.npy")  # step labels, where the data has them
        self.first_error = np.load(fe_path) if os.path.isfile(fe_path) else np.full(len(idx), -1, dtype=np.int64)
        self.has_step_labels = os.path.isfile(fe_path)
        if self.first_error.shape != (len(idx),):
            raise ValueError(f"{fe_path}: expected ({len(idx)},) token positions, got shape {self.first_error.shape}")
        if int((idx[:, 0] + idx[:, 2]).max()) > len(self.tokens):
            raise ValueError(f"{bin_path}: holds {len(self.tokens)} tokens, fewer than {idx_path} indexes "
                             f"(truncated file?)")
        if overflow not in ("truncate", "drop"):
            raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
        self.idx = idx
        self.lengths = idx[:, 2].copy()  # (N,) after truncation
        keep = np.ones(len(idx), dtype=bool)
        self.n_truncated = self.n_dropped = 0
        if max_length is not None:
            over = self.lengths > max_length
            drop = over if overflow == "drop" else over & (idx[:, 1] >= max_length)
            keep = ~drop
            self.n_dropped = int(drop.sum())
            self.n_truncated = int((over & keep).sum())
            self.lengths = np.minimum(self.lengths, max_length)
        rows = np.nonzero(keep)[0]
        if len(rows) == 0:
            raise ValueError(f"{idx_path}: all {len(idx)} rows are longer than max_length={max_length}")
        self.rows = select_rows(rows, idx[rows, 3], n_samples, balance_correct, correct_ratio, seed, idx_path)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        offset, prompt_len, _, label, problem = (int(x) for x in self.idx[row])
        length = int(self.lengths[row])
        return {"index": row, "tokens": np.array(self.tokens[offset:offset + length], dtype=np.int64),
                "prompt_len": prompt_len, "reward": float(label), "problem": problem,
                "first_error": int(self.first_error[row])}


def collate(items, pad_id):
    """Right-pad a list of dataset items into a batch; loss_mask is 1 exactly on completion tokens."""
    B, L = len(items), max(len(item["tokens"]) for item in items)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # (B, L)
    loss_mask = torch.zeros((B, L), dtype=torch.float32)  # (B, L)
    for b, item in enumerate(items):
        n = len(item["tokens"])
        input_ids[b, :n] = torch.from_numpy(item["tokens"])
        loss_mask[b, item["prompt_len"]:n] = 1.0
    return {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "reward": torch.tensor([item["reward"] for item in items], dtype=torch.float32),  # (B,)
        "lengths": torch.tensor([len(item["tokens"]) for item in items], dtype=torch.long),  # (B,)
        "prompt_lens": torch.tensor([item["prompt_len"] for item in items], dtype=torch.long),  # (B,)
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),  # (B,) row ids in the split
        "problem": torch.tensor([item["problem"] for item in items], dtype=torch.long),  # (B,)
        # (B,) token position of the row's first wrong step; -1: none, or no step labels in the data
        "first_error": torch.tensor([item.get("first_error", -1) for item in items], dtype=torch.long),
    }


class ResumableSampler(torch.utils.data.DistributedSampler):
    """
    torch's DistributedSampler (the epoch order is randperm seeded by seed + epoch, or 0..n-1
    without shuffle; rank r reads order[r::world_size]; set_epoch every epoch) plus:
    - exact mid-epoch resume: set_skip(n) makes the next iteration start at this rank's n-th
      sample of the current epoch's order (one-shot: the iteration after that starts at 0 again);
    - pad=False (validation): every sample exactly once over all ranks, no repeats (ranks may get
      one sample fewer). pad=True (training) is DistributedSampler's padding: the order's head is
      repeated so that every rank gets ceil(n / world_size) samples.
    """

    def __init__(self, dataset, rank=0, world_size=1, shuffle=True, seed=0, pad=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.pad, self.skip = pad, 0
        if not pad:
            self.num_samples = len(range(rank, len(dataset), world_size))

    def set_skip(self, n):
        if not 0 <= n <= self.num_samples:
            raise ValueError(f"set_skip({n}): this rank has {self.num_samples} samples per epoch")
        self.skip = n

    def __iter__(self):
        if self.pad:
            order = list(super().__iter__())
        else:
            order = list(range(len(self.dataset)))
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(self.seed + self.epoch)
                order = torch.randperm(len(self.dataset), generator=g).tolist()
            order = order[self.rank::self.num_replicas]
        order, self.skip = order[self.skip:], 0
        return iter(order)

    def __len__(self):
        return self.num_samples - self.skip


def make_loader(ds, batch_size, pad_id, shuffle, seed, rank=0, world_size=1, pad=True, pin_memory=False):
    """(DataLoader, sampler) over ds for this rank; keep the sampler for set_epoch / set_skip."""
    sampler = ResumableSampler(ds, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, pad=pad)
    # its own generator: a DataLoader iterator otherwise draws a base seed from the global RNG at
    # every epoch start, which would shift the training RNG stream of a resumed run
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler,
                                         collate_fn=functools.partial(collate, pad_id=pad_id), num_workers=0,
                                         pin_memory=pin_memory, drop_last=False,
                                         generator=torch.Generator().manual_seed(seed))
    return loader, sampler
