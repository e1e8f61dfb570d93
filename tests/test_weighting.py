"""weighting.py against hand-computed numbers and against plain-Python loop implementations of
SPEC's formulas. Tolerance: 1e-6 absolute on float32 results unless stated."""

import math
import random

import pytest
import torch

from tests.helpers import weighted_mtp_ce
from weighting import (auc, binary_accuracy, build_weights, compute_mtp_selective_weights, compute_td_errors,
                       n_selected, normalize_weights, on_track, oracle_prefix_weights, random_like_weights, select_top_k,
                       shift_to_heads, shuffle_within_rows, value_loss, value_mask, weight_stats)

ATOL = 1e-6


def close(actual, expected, atol=ATOL):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=0)


def random_contiguous_mask(B, L, rng, allow_empty=True):
    """Rows of the data layout: [prompt (>= 1 token)] [completion] [padding]; some rows empty."""
    mask = [[0.0] * L for _ in range(B)]
    for b in range(B):
        if allow_empty and rng.random() < 0.2:
            continue
        first = rng.randint(1, L - 1)
        last = rng.randint(first, L - 1)
        for t in range(first, last + 1):
            mask[b][t] = 1.0
    return mask


# -----------------------------------------------------------------------------
# TD errors

def td_errors_loop(V, R, mask, gamma):
    """SPEC's formula with Python floats, one token at a time."""
    out = []
    for b in range(len(V)):
        idx = [t for t in range(len(V[b])) if mask[b][t] > 0]
        row = [0.0] * len(V[b])
        for t in idx:
            target = R[b] if t == idx[-1] else gamma * V[b][t]
            row[t] = target - (V[b][t - 1] if t > 0 else 0.0)
        out.append(row)
    return out


def test_td_errors_hand_example():
    V = torch.tensor([[0.1, 0.2, 0.5, 0.4, 0.9, 0.0],    # completion at 2..4, correct
                      [0.3, 0.6, 0.2, 0.7, 0.1, 0.8],    # one-token completion at 1, incorrect
                      [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])   # no completion tokens
    R = torch.tensor([1.0, 0.0, 1.0])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0],
                         [0, 1, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    # gamma = 1: row 0: 0.5-0.2, 0.4-0.5, R-0.4; row 1
    close(compute_td_errors(V, R, mask), [[0, 0, 0.3, -0.1, 0.6, 0],
                                          [0, -0.3, 0, 0, 0, 0],
                                          [0, 0, 0, 0, 0, 0]])
    # telescoping: a row's deltas sum to R - V[first-1]
    close(compute_td_errors(V, R, mask).sum(1), [1 - 0.2, 0 - 0.3, 0])
    # gamma = 0.5: row 0: 0.25-0.2, 0.2-0.5, R-0.4 (the last token's target is R, not gamma*V)
    close(compute_td_errors(V, R, mask, gamma=0.5), [[0, 0, 0.05, -0.3, 0.6, 0],
                                                     [0, -0.3, 0, 0, 0, 0],
                                                     [0, 0, 0, 0, 0, 0]])


def test_td_errors_completion_at_position_zero_uses_zero_prior():
    V = torch.tensor([[0.4, 0.7, 0.2]])
    close(compute_td_errors(V, torch.tensor([1.0]), torch.tensor([[1.0, 1.0, 0.0]])), [[0.4, 0.6, 0.0]])


def test_td_errors_match_loop_and_float32():
    rng = random.Random(0)
    torch.manual_seed(0)
    B, L = 7, 11
    mask = random_contiguous_mask(B, L, rng)
    V = torch.rand(B, L)
    R = torch.randint(0, 2, (B,)).float()
    for gamma in (1.0, 0.9, 0.0):
        out = compute_td_errors(V, R, torch.tensor(mask), gamma=gamma)
        close(out, td_errors_loop(V.tolist(), R.tolist(), mask, gamma), atol=1e-6)
    out = compute_td_errors(V.bfloat16(), R, torch.tensor(mask).bool())
    assert out.dtype == torch.float32
    close(out, td_errors_loop(V.bfloat16().float().tolist(), R.tolist(), mask, 1.0))


# -----------------------------------------------------------------------------
# TD weights

def test_build_weights_clip_both_ends_no_overflow():
    beta = 0.9
    td = torch.tensor([[0.0, beta * math.log(2.0), 9.0, -9.0, 1000.0, 3.0]])  # 1000/beta would overflow exp
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    w = build_weights(td, mask, beta=beta, clip_min=0.1, clip_max=5.0, normalize=False)
    assert torch.isfinite(w).all()
    close(w, [[1.0, 2.0, 5.0, 0.1, 5.0, 0.0]])
    assert w[0, 2].item() == pytest.approx(5.0, abs=0) and w[0, 3].item() == torch.tensor(0.1).item()  # exact bounds
    # normalize: mean over the 5 valid tokens becomes 1 (sum 13.1 -> 5); may exceed clip_max/clip_min
    wn = build_weights(td, mask, beta=beta, clip_min=0.1, clip_max=5.0, normalize=True)
    close(wn, [[1 / 2.62, 2 / 2.62, 5 / 2.62, 0.1 / 2.62, 5 / 2.62, 0.0]])
    assert wn[mask > 0].mean().item() == pytest.approx(1.0, abs=1e-6)


def test_build_weights_whiten_population_std():
    td = torch.tensor([[1.0, 2.0, 3.0, 50.0]])      # the masked 50 must not enter mean/std
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    s = math.sqrt(2 / 3)                           # population std of 1, 2, 3
    w = build_weights(td, mask, beta=1.0, clip_min=0.01, clip_max=100.0, whiten=True, normalize=False)
    close(w, [[math.exp(-1 / s), 1.0, math.exp(1 / s), 0.0]], atol=1e-5)
    w = build_weights(td, mask, beta=2.0, clip_min=0.01, clip_max=100.0, whiten=False, normalize=False)
    close(w, [[math.exp(0.5), math.exp(1.0), math.exp(1.5), 0.0]], atol=1e-5)
    # one valid token: std 0 -> a = 0 -> w = 1, no NaN
    w = build_weights(torch.tensor([[7.0, 1.0]]), torch.tensor([[0.0, 1.0]]), whiten=True, normalize=False)
    close(w, [[0.0, 1.0]])


def test_build_weights_population_split_over_ranks_equals_the_whole():
    """whiten and normalize over a population held in parts (ranks, or micro-batches concatenated):
    each part with reduce = a sum over the parts (an all-reduce, here two threads) gets exactly
    the weights of the whole tensor; with reduce=None each part is its own population."""
    import threading
    torch.manual_seed(3)
    rng = random.Random(3)
    td = torch.randn(6, 11)
    mask = torch.tensor(random_contiguous_mask(6, 11, rng, allow_empty=False))
    whole = build_weights(td, mask, 0.5, 0.2, 4.0, whiten=True, normalize=True)
    parts, out, slots, barrier = [(0, 2), (2, 6)], [None, None], [None, None], threading.Barrier(2)

    def all_reduce_sum(rank, t):  # what ddp_utils.all_reduce_sum does across two processes
        slots[rank] = t.clone()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        return t.copy_(total)

    def rank_main(rank):
        lo, hi = parts[rank]
        out[rank] = build_weights(td[lo:hi], mask[lo:hi], 0.5, 0.2, 4.0, whiten=True, normalize=True,
                                  reduce=lambda t: all_reduce_sum(rank, t))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    close(torch.cat(out), whole, atol=1e-5)
    alone = build_weights(td[:2], mask[:2], 0.5, 0.2, 4.0, whiten=True, normalize=True)
    assert (alone - whole[:2]).abs().max().item() > 1e-3  # a different population, different weights
    assert (alone * mask[:2]).sum().item() == pytest.approx(mask[:2].sum().item(), rel=1e-5)  # mean 1 on its own


def test_build_weights_empty_mask_and_detached():
    td = torch.randn(3, 5, requires_grad=True)
    for whiten in (False, True):
        w = build_weights(td, torch.zeros(3, 5), whiten=whiten, normalize=True)
        close(w, torch.zeros(3, 5))
    w = build_weights(td, torch.ones(3, 5))
    assert not w.requires_grad and w.dtype == torch.float32
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_build_weights_match_loop():
    rng = random.Random(1)
    torch.manual_seed(1)
    B, L, beta, lo, hi = 5, 9, 0.7, 0.2, 3.0
    mask = random_contiguous_mask(B, L, rng)
    td = torch.randn(B, L)
    valid = [(b, t) for b in range(B) for t in range(L) if mask[b][t]]
    raw = {(b, t): min(max(math.exp(td[b, t].item() / beta), lo), hi) for b, t in valid}
    mean = sum(raw.values()) / len(raw)
    expected = [[raw[(b, t)] / mean if (b, t) in raw else 0.0 for t in range(L)] for b in range(B)]
    close(build_weights(td, torch.tensor(mask), beta=beta, clip_min=lo, clip_max=hi), expected, atol=1e-5)


def test_weight_stats():
    beta = 0.9
    td = torch.tensor([[0.0, beta * math.log(2.0), 9.0, -9.0, 1000.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    w = build_weights(td, mask, beta=beta, normalize=False)            # [1, 2, 5, 0.1, 5 | 0]
    st = weight_stats(w, mask, td_errors=td, beta=beta, clip_min=0.1, clip_max=5.0)
    vals = [1.0, 2.0, 5.0, 0.1, 5.0]
    mean = sum(vals) / 5
    assert st["n"] == 5
    assert st["mean"] == pytest.approx(mean, abs=1e-6)
    assert st["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in vals) / 5), abs=1e-6)
    assert st["min"] == pytest.approx(0.1, abs=1e-7) and st["max"] == pytest.approx(5.0, abs=1e-6)
    assert (st["frac_clipped_low"], st["frac_clipped_high"]) == pytest.approx((0.2, 0.4))
    assert st["frac_clipped"] == pytest.approx(0.6)
    assert all(isinstance(v, float) for v in st.values())
    # normalized weights: same clip fractions (from the TD errors), mean 1
    st = weight_stats(build_weights(td, mask, beta=beta), mask, td_errors=td, beta=beta)
    assert st["mean"] == pytest.approx(1.0, abs=1e-6) and st["frac_clipped"] == pytest.approx(0.6)
    # without td_errors: no clip keys; empty mask: zeros
    assert set(weight_stats(w, mask)) == {"n", "mean", "std", "min", "max"}
    st = weight_stats(w, torch.zeros_like(mask), td_errors=td)
    assert st == {"n": 0.0, "mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0,
                  "frac_clipped_low": 0.0, "frac_clipped_high": 0.0, "frac_clipped": 0.0}


# -----------------------------------------------------------------------------
# Controls: random and shuffled weights

def test_random_like_weights_keeps_multiset_and_mask():
    torch.manual_seed(2)
    mask = torch.tensor(random_contiguous_mask(6, 12, random.Random(2)))
    w = build_weights(torch.randn(6, 12), mask)
    g = torch.Generator().manual_seed(0)
    r = random_like_weights(w, mask, g)
    assert torch.equal(r[mask > 0].sort().values, w[mask > 0].sort().values)
    assert (r[mask == 0] == 0).all()
    assert not torch.equal(r, w)                                       # it did move weights
    assert torch.equal(r, random_like_weights(w, mask, torch.Generator().manual_seed(0)))  # seeded


def test_shuffle_within_rows_keeps_each_rows_multiset():
    torch.manual_seed(3)
    mask = torch.tensor(random_contiguous_mask(6, 12, random.Random(3)))
    w = build_weights(torch.randn(6, 12), mask)
    s = shuffle_within_rows(w, mask, torch.Generator().manual_seed(0))
    for b in range(6):
        m = mask[b] > 0
        assert torch.equal(s[b][m].sort().values, w[b][m].sort().values)
        assert (s[b][~m] == 0).all()
    assert not torch.equal(s, w)
    assert torch.equal(s, shuffle_within_rows(w, mask, torch.Generator().manual_seed(0)))


# -----------------------------------------------------------------------------
# Rho-1 selection

def selective_loop(excess, mask, k_percent):
    """Head 0 = mask; head k: ceil(k% of valid) largest, ties -> lowest flat index b*L+t."""
    B, L, n = len(excess), len(excess[0]), len(excess[0][0])
    out = [[[0.0] * n for _ in range(L)] for _ in range(B)]
    for b in range(B):
        for t in range(L):
            out[b][t][0] = 1.0 if mask[b][t][0] else 0.0
    for k in range(1, n):
        valid = [(b, t) for b in range(B) for t in range(L) if mask[b][t][k]]
        valid.sort(key=lambda bt: (-excess[bt[0]][bt[1]][k], bt[0] * L + bt[1]))
        n_sel = math.ceil(round(k_percent * len(valid), 9))
        for b, t in valid[:n_sel]:
            out[b][t][k] = 1.0
    return out


def test_selective_weights_hand_example():
    # B=2, L=3, n=3. Invalid targets carry a huge excess that must never be picked.
    excess = torch.tensor([[[0.1, 0.5, 0.7], [0.2, -1.0, 0.7], [0.3, 99.0, 99.0]],
                           [[0.4, 0.9, 0.7], [0.5, 0.2, 0.7], [0.6, 0.3, 0.1]]])
    mask = torch.tensor([[[1, 1, 1], [1, 1, 1], [1, 0, 0]],
                         [[1, 1, 1], [1, 1, 1], [0, 1, 1]]], dtype=torch.float32)
    w = compute_mtp_selective_weights(excess, mask, k_percent=0.6)
    # head 0 = its mask
    close(w[..., 0], mask[..., 0])
    # head 1: 5 valid (0.5, -1.0, 0.9, 0.2, 0.3), ceil(0.6*5) = 3 -> 0.9, 0.5, 0.3
    close(w[..., 1], [[1, 0, 0], [1, 0, 1]])
    # head 2: 5 valid (0.7, 0.7, 0.7, 0.7, 0.1), 3 picked among four tied 0.7s -> lowest flat index
    close(w[..., 2], [[1, 1, 0], [1, 0, 0]])
    # ceil rounding: k=0.5 of 5 -> 3; k=0.1 of 5 -> 1; k=1 -> all valid
    assert w.dtype == torch.float32
    w = compute_mtp_selective_weights(excess, mask, k_percent=0.5)
    close(w[..., 1], [[1, 0, 0], [1, 0, 1]])
    w = compute_mtp_selective_weights(excess, mask, k_percent=0.1)
    close(w[..., 1], [[0, 0, 0], [1, 0, 0]])
    close(w[..., 2], [[1, 0, 0], [0, 0, 0]])
    close(compute_mtp_selective_weights(excess, mask, k_percent=1.0), mask)


def test_select_top_k_hand_example():
    """Rho-1's selection of one head: the ceil(k * n_valid) valid entries with the largest score
    over the whole (B, L) tensor; ties by the lowest flat index; invalid entries never."""
    scores = torch.tensor([[1.0, 0.5, 0.5, 50.0], [0.7, -1.0, 3.0, 2.0]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # 5 valid; 50.0, 3.0, 2.0 are not targets
    # ceil(0.5 * 5) = 3: 1.0, 0.7, then of the tie 0.5 / 0.5 the lower flat index (0, 1)
    close(select_top_k(scores, valid, 0.5), [[1, 1, 0, 0], [1, 0, 0, 0]])
    close(select_top_k(scores, valid, 0.4), [[1, 0, 0, 0], [1, 0, 0, 0]])  # ceil(2.0) = 2
    close(select_top_k(scores, valid, 1.0), valid)
    close(select_top_k(scores, torch.zeros(2, 4), 0.6), torch.zeros(2, 4))
    assert n_selected(5, 0.5).item() == 3 and n_selected(torch.tensor([10, 0, 1200]), 0.81).tolist() == [9, 0, 972]


def test_selective_weights_float_noise_and_validation():
    # 0.81 * 1200 = 972.0000000000001 in floating point; the selection must be 972, not 973
    excess = torch.randn(4, 300, 2, generator=torch.Generator().manual_seed(0))
    w = compute_mtp_selective_weights(excess, torch.ones(4, 300, 2), k_percent=0.81)
    assert w[..., 1].sum().item() == 972
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            compute_mtp_selective_weights(excess, torch.ones(4, 300, 2), k_percent=bad)
    # no valid target at all: zeros
    close(compute_mtp_selective_weights(excess, torch.zeros(4, 300, 2)), torch.zeros(4, 300, 2))


def test_selective_weights_match_loop_with_ties():
    rng = random.Random(4)
    torch.manual_seed(4)
    B, L, n = 4, 10, 4
    mask = shift_to_heads(torch.tensor(random_contiguous_mask(B, L, rng)), n)
    excess = torch.randint(-2, 3, (B, L, n)).float()                  # many ties
    for k_percent in (0.6, 0.25, 0.5, 1.0):
        w = compute_mtp_selective_weights(excess, mask, k_percent)
        close(w, selective_loop(excess.tolist(), mask.tolist(), k_percent))


# -----------------------------------------------------------------------------
# Head alignment and value-head targets

def test_shift_to_heads_alignment():
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    # [t, k] = mask[t+k+1]: which heads have a completion target where
    close(shift_to_heads(mask, 3)[0], [[0, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
    close(shift_to_heads(mask, 1)[0], [[0], [1], [1], [1], [0], [0]])
    w = torch.tensor([[10.0, 11.0, 12.0, 13.0, 14.0, 15.0]])  # token weights -> each head's weights
    close(shift_to_heads(w, 3)[0], [[11, 12, 13], [12, 13, 14], [13, 14, 15], [14, 15, 0], [15, 0, 0], [0, 0, 0]])
    assert shift_to_heads(mask.bool(), 2).dtype == torch.bool


def test_value_mask():
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0],
                         [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                         [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    close(value_mask(mask), [[0, 1, 1, 1, 1, 0],        # last prompt position 1, completion 2..4
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0]])


def test_value_loss():
    V = torch.tensor([[0.2, 0.5, 0.9], [0.3, 0.4, 0.0]], requires_grad=True)
    R = torch.tensor([1.0, 0.0])
    vmask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss = value_loss(V, R, vmask)                   # (0.5^2 + 0.1^2 + 0.3^2 + 0.4^2) / 4
    assert loss.item() == pytest.approx(0.51 / 4, abs=1e-7)
    loss.backward()
    close(V.grad, [[0, 2 * (0.5 - 1) / 4, 2 * (0.9 - 1) / 4], [2 * 0.3 / 4, 2 * 0.4 / 4, 0]])
    assert value_loss(V.detach(), R, vmask, count=8.0).item() == pytest.approx(0.51 / 8, abs=1e-7)  # a step's count
    assert value_loss(V.bfloat16(), R, torch.zeros(2, 3)).item() == 0.0
    assert value_loss(V.bfloat16(), R, vmask).dtype == torch.float32


def test_weighted_mtp_ce():
    ce = torch.tensor([[[1.0, 4.0, 7.0], [2.0, 5.0, 8.0], [3.0, float("inf"), float("nan")]]])  # (1, 3, 3)
    w = torch.tensor([[[1.0, 0.5, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]])
    loss, heads = weighted_mtp_ce(ce, w)
    # head 0: (1 + 2) / 2; head 1: (0.5*4 + 2*5) / 2; head 2: no target -> 0
    close(heads, [1.5, 6.0, 0.0])
    assert loss.item() == pytest.approx(7.5 / 3)


# -----------------------------------------------------------------------------
# Critic metrics

def auc_pairs(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))


def test_auc_and_accuracy():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # ties count 1/2: positives {0.5, 0.9}, negatives {0.2, 0.5, 0.5} -> (1 + .5 + .5 + 3) / 6
    assert auc(torch.tensor([0.2, 0.5, 0.5, 0.5, 0.9]), torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])) == pytest.approx(5 / 6)
    assert auc(torch.tensor([0.3, 0.3]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    g = torch.Generator().manual_seed(5)
    s = torch.randint(0, 5, (40,), generator=g).float() / 4              # many ties
    y = torch.randint(0, 2, (40,), generator=g)
    assert auc(s, y) == pytest.approx(auc_pairs(s.tolist(), y.tolist()), abs=1e-12)
    # accuracy: predictions (score >= 0.5) = [0, 1, 1, 0] vs labels [0, 1, 0, 1]
    assert binary_accuracy(torch.tensor([0.2, 0.5, 0.7, 0.4]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.5)
    assert binary_accuracy(torch.tensor([0.2, 0.5]), torch.tensor([0, 1]), threshold=0.6) == pytest.approx(0.5)


# -----------------------------------------------------------------------------
# Step labels: positive controls and the prefix critic

# three rows of length 8: prompt 0..2, completion 3..7 (row 2: 3..5, then padding)
STEP_MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0, 0]]).float()
FIRST_ERROR = torch.tensor([-1, 5, 4])   # row 0 all right; row 1 wrong from token 5; row 2 from 4
REWARD = torch.tensor([1.0, 0.0, 1.0])   # row 2: a slip that still reached the right answer


def test_on_track_is_the_prefix_critics_target():
    close(on_track(FIRST_ERROR, 8), [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    # the prefix critic's loss: per-position targets over the value positions
    V = torch.full((3, 8), 0.5)
    vm = value_mask(STEP_MASK)  # positions 2..7 (row 2: 2..5)
    expected = (6 * 0.25 + 6 * 0.25 + 4 * 0.25) / 16  # every target is 0 or 1, V = 0.5
    assert value_loss(V, on_track(FIRST_ERROR, 8), vm).item() == pytest.approx(expected)
    V = on_track(FIRST_ERROR, 8)
    assert value_loss(V, on_track(FIRST_ERROR, 8), vm).item() == 0.0  # a perfect prefix critic


def test_oracle_prefix_and_reward_weights_hand_example():
    w = oracle_prefix_weights(STEP_MASK, FIRST_ERROR, REWARD)
    close(w, [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0]])  # correct rows keep all
    close(normalize_weights(w, STEP_MASK), (w * 13 / 10).tolist())  # 13 completion tokens, 10 kept: mean 1
    reward = STEP_MASK * REWARD[:, None]  # weight_mode='reward': correct rows only
    close(normalize_weights(reward, STEP_MASK), (reward * 13 / 8).tolist())


def test_oracle_td_weights_hand_example():
    """TD weights of a perfect prefix critic: delta is -1 at the first wrong token (V drops from 1
    to 0), +1 at the last token of a correct row whose prefix went wrong (R = 1 after V = 0), 0
    elsewhere; w = clamp(exp(delta / beta)), before normalisation."""
    td = compute_td_errors(on_track(FIRST_ERROR, 8), REWARD, STEP_MASK)
    close(td, [[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, -1, 0, 0], [0, 0, 0, 0, -1, 1, 0, 0]])
    w = build_weights(td, STEP_MASK, beta=0.9, clip_min=0.1, clip_max=5.0, normalize=False)
    e = math.exp(-1 / 0.9)
    close(w, [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, e, 1, 1], [0, 0, 0, 1, e, 1 / e, 0, 0]], atol=1e-6)



def test_stage2_weights_every_mode():
    """train_verifiable's weight modes on the hand-made batch: the controls keep the TD weights'
    multiset (random over the batch, shuffled within each row), the positive controls are the
    hand examples above, uniform is the mask; an unknown mode is a ValueError."""
    from weighting import WEIGHT_MODES, stage2_weights
    torch.manual_seed(0)
    values = torch.rand(3, 8)
    td_w, td = stage2_weights("td", values, REWARD, STEP_MASK, FIRST_ERROR)
    close(td_w, build_weights(compute_td_errors(values, REWARD, STEP_MASK), STEP_MASK))
    for mode in WEIGHT_MODES:
        w, errors = stage2_weights(mode, values, REWARD, STEP_MASK, FIRST_ERROR)
        assert w.shape == (3, 8) and (w[STEP_MASK == 0] == 0).all(), mode
        assert (errors is None) == (mode in ("uniform", "oracle_prefix", "reward")), mode
        if mode in ("random", "shuffled"):
            assert sorted(w[STEP_MASK > 0].tolist()) == pytest.approx(sorted(td_w[STEP_MASK > 0].tolist()))
        if mode == "shuffled":
            close((w * STEP_MASK).sum(1), (td_w * STEP_MASK).sum(1), atol=1e-5)  # each row keeps its own total
    close(stage2_weights("uniform", values, REWARD, STEP_MASK, FIRST_ERROR)[0], STEP_MASK)
    expected = oracle_prefix_weights(STEP_MASK, FIRST_ERROR, REWARD) * 13 / 10
    close(stage2_weights("oracle_prefix", values, REWARD, STEP_MASK, FIRST_ERROR)[0], expected)
    close(stage2_weights("reward", values, REWARD, STEP_MASK, FIRST_ERROR, normalize=False)[0], STEP_MASK * REWARD[:, None])
    oracle_td = stage2_weights("oracle_td", values, REWARD, STEP_MASK, FIRST_ERROR, normalize=False)[0]
    e = math.exp(-1 / 0.9)
    close(oracle_td, [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, e, 1, 1], [0, 0, 0, 1, e, 1 / e, 0, 0]], atol=1e-6)
    with pytest.raises(ValueError, match="weight_mode 'bogus'"):
        stage2_weights("bogus", values, REWARD, STEP_MASK, FIRST_ERROR)
