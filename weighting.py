"""
Token weights for the weighted MTP losses, plus the small losses and metrics around them.

Notation (README, "The four stages"):
  mask[b,t]  1 where token t is a completion token (contiguous per row, may be empty)
  R[b]       reward: 1.0 for a correct sample, 0.0 otherwise
  V[b,t]     value head's estimate of R after reading tokens 0..t
  ce[b,t,k]  head k's cross-entropy at position t against token t+k+1

Stage 2 (verifiable): TD errors of the value head -> exp(delta / beta) weights per token.
Stage 3 (rho-1): top-k% excess-loss selection per MTP head.
Everything is vectorized torch and computed in float32. Batch-level statistics (whitening,
normalization, top-k selection) are over the tensor handed in; build_weights' `reduce` extends
its sums to other ranks. The training scripts choose the population (`weight_scope`,
`selection_scope`): one micro-batch, or the whole optimizer step on all ranks.
"""
import math

import torch

# -----------------------------------------------------------------------------
# Stage 2: TD errors and TD weights

def compute_td_errors(values, rewards, mask, gamma=1.0):
    """
    TD error of every completion token: how much reading token t changed the value estimate.

      delta[b,t] = target[b,t] - V[b,t-1]     for mask[b,t] = 1, else 0
      target[b,t] = R[b]            at the row's last completion token
                  = gamma * V[b,t]  elsewhere

    With gamma = 1 the deltas of a row telescope to R[b] - V[b, first-1]. Rows without
    completion tokens are all zero. A completion token at t = 0 has no V[b,-1]; we use
    V[b,-1] = 0 there (the data always starts with bos + prompt, so this does not happen in
    training, and no data-dependent check or GPU sync is needed). Computed in float32; the
    result keeps the autograd graph of `values` (build_weights detaches).

    values (B, L), rewards (B,), mask (B, L) -> (B, L) float32
    """
    V = values.float()                                   # (B, L)
    R = rewards.float().to(V.device)                     # (B,)
    m = mask.to(V.device) > 0                            # (B, L) bool
    B, L = V.shape
    V_prev = torch.cat([V.new_zeros(B, 1), V[:, :-1]], dim=1)             # (B, L) V[b,t-1], 0 at t=0
    pos = torch.arange(L, device=V.device).expand(B, L)                   # (B, L)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=1)      # (B,) -1 for empty rows
    is_last = m & (pos == last[:, None])                                  # (B, L)
    target = torch.where(is_last, R[:, None].expand(B, L), gamma * V)     # (B, L)
    return torch.where(m, target - V_prev, torch.zeros_like(V))


def _population_sums(x, m, reduce):
    """(sum of x, sum of x^2, count) over the valid entries, summed over the population by `reduce`
    (None: this tensor only; e.g. ddp_utils.all_reduce_sum: every rank's too). float64 sums, so the
    result does not depend on how the population is split."""
    x = torch.where(m, x, 0.0).double()
    sums = torch.stack([x.sum(), (x * x).sum(), m.sum().double()])
    return reduce(sums) if reduce is not None else sums


def _whiten(a, m, reduce=None, eps=1e-8):
    """(a - mean) / (std + eps) over the valid tokens of the population; population std (divide
    by n), so a single valid token gives 0 instead of NaN."""
    total, total_sq, n = _population_sums(a, m, reduce)
    n = n.clamp_min(1)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0)
    return ((a - mean) / (var.sqrt() + eps)).float()


def _log_bounds(clip_min, clip_max):
    if not (0 <= clip_min <= clip_max):
        raise ValueError(f"need 0 <= clip_min <= clip_max, got clip_min={clip_min}, clip_max={clip_max}")
    lo = math.log(clip_min) if clip_min > 0 else -math.inf
    return lo, math.log(clip_max)


def _td_exponent(td_errors, m, beta, whiten, reduce=None):
    """z = a / beta, the log of the unclipped weight (shared by build_weights and weight_stats)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    a = td_errors.detach().float()
    if whiten:
        a = _whiten(a, m, reduce)
    return a / beta


def build_weights(td_errors, mask, beta=0.9, clip_min=0.1, clip_max=5.0, whiten=False, normalize=True,
                  reduce=None):
    """
    Per-token loss weights from TD errors: tokens that raised the chance of success weigh more.

      a = delta, or (delta - mean) / (std + 1e-8) over the population's valid tokens when whiten
          (population std, i.e. divided by n, not n - 1)
      w = clamp(exp(a / beta), clip_min, clip_max), 0 outside the mask
      normalize: w *= n_valid / sum(w) over the population, so the mean weight over its valid
          tokens is 1 and the weighted loss has the baseline's scale (values may then leave
          [clip_min, clip_max]).

    The population is this tensor (reduce=None), e.g. one micro-batch, or the step's micro-batches
    padded and concatenated; reduce=ddp_utils.all_reduce_sum adds every rank's (whitening and
    normalisation then use sums over all of them; one small all-reduce each).

    Stable: a / beta is clamped to [log clip_min, log clip_max] before exp, so a huge delta
    never overflows; clipped tokens get the bound exactly. No valid token -> all zeros.

    td_errors (B, L), mask (B, L) -> (B, L) float32, detached
    """
    m = mask.to(td_errors.device) > 0                    # (B, L)
    z = _td_exponent(td_errors, m, beta, whiten, reduce)  # (B, L)
    lo, hi = _log_bounds(clip_min, clip_max)
    w = torch.exp(z.clamp(lo, hi))
    w = torch.where(z >= hi, clip_max, torch.where(z <= lo, clip_min, w))  # exact bounds
    w = torch.where(m, w, 0.0)
    if normalize:
        w = normalize_weights(w, m, reduce)
    return w.detach()


def weight_stats(weights, mask, td_errors=None, beta=0.9, clip_min=0.1, clip_max=5.0, whiten=False):
    """
    Logging statistics of token weights over the valid tokens (mask > 0), as python floats.

    Always: mean, std (population), min, max, n (number of valid tokens); all 0.0 if none.
    With td_errors (pass the same beta/clip/whiten as build_weights): frac_clipped_low,
    frac_clipped_high, frac_clipped = fractions of valid tokens whose weight before
    normalization hit clip_min / clip_max / either. They are recomputed from the TD errors
    because after normalization the weights no longer show which ones were clipped; without
    td_errors these keys are absent.

    weights, mask, td_errors: (B, L) (the basic stats also take (B, L, n)) -> dict[str, float]
    """
    m = mask.to(weights.device) > 0
    w = weights.detach().float()
    n = m.sum()
    nf = n.clamp_min(1).float()
    mean = torch.where(m, w, 0.0).sum() / nf
    std = (torch.where(m, (w - mean) ** 2, 0.0).sum() / nf).sqrt()
    wmin = torch.where(m, w, math.inf).amin() if w.numel() else w.new_tensor(math.inf)
    wmax = torch.where(m, w, -math.inf).amax() if w.numel() else w.new_tensor(-math.inf)
    has = n > 0
    stats = [n.float(), mean, std, torch.where(has, wmin, 0.0), torch.where(has, wmax, 0.0)]
    keys = ["n", "mean", "std", "min", "max"]
    if td_errors is not None:
        mt = mask.to(td_errors.device) > 0
        z = _td_exponent(td_errors, mt, beta, whiten)
        lo, hi = _log_bounds(clip_min, clip_max)
        ntf = mt.sum().clamp_min(1).float()
        low = (mt & (z <= lo)).sum() / ntf
        high = (mt & (z >= hi)).sum() / ntf
        stats += [low.to(w.device), high.to(w.device), (low + high).to(w.device)]
        keys += ["frac_clipped_low", "frac_clipped_high", "frac_clipped"]
    values = torch.stack([s.float() for s in stats]).tolist()  # one device sync
    return dict(zip(keys, values))


def normalize_weights(weights, mask, reduce=None):
    """Rescale so that the mean weight over the population's valid tokens is 1 (all-zero stays
    all-zero); `reduce` as in build_weights. weights, mask (B, L) -> (B, L) float32"""
    m = mask.to(weights.device) > 0
    w = torch.where(m, weights.float(), 0.0)
    total, _, n = _population_sums(w, m, reduce)
    return (w * (n / total.clamp_min(1e-30))).float()


# -----------------------------------------------------------------------------
# Step labels (datasets whose verifier finds the first wrong step, e.g. data/arith): positive
# controls for Stage 2 and the targets of a prefix critic

def on_track(first_error, length):
    """
    1.0 at the positions before each row's first wrong step, 0.0 from it on: the value a perfect
    prefix critic gives after reading tokens 0..t. first_error (B,) is the token position of the
    first wrong step, -1 when there is none (then the whole row is on track).

    first_error (B,), length L -> (B, L) float32
    """
    pos = torch.arange(length, device=first_error.device)[None, :]            # (1, L)
    return ((first_error[:, None] < 0) | (pos < first_error[:, None])).float()


def oracle_prefix_weights(loss_mask, first_error, rewards):
    """
    Positive control 'oracle_prefix': weight 1 on the completion tokens before the first wrong
    step, 0 from it on; a correct row (R = 1) keeps every token.

    loss_mask (B, L), first_error (B,), rewards (B,) -> (B, L) float32
    """
    keep = torch.maximum(on_track(first_error, loss_mask.shape[1]), (rewards > 0.5).float()[:, None])
    return loss_mask.float() * keep


# -----------------------------------------------------------------------------
# Stage 2's weight_mode: TD weights, their controls, and the positive controls

WEIGHT_MODES = ("td", "uniform", "random", "shuffled", "oracle_prefix", "oracle_td", "reward")


def stage2_weights(weight_mode, values, rewards, loss_mask, first_error, gamma=1.0, beta=0.9, clip_min=0.1,
                   clip_max=5.0, whiten=False, normalize=True, reduce=None):
    """
    Per-token weights (B, L) of train_verifiable.py's weight_mode, and the TD errors behind them
    (for the clip statistics; None for the modes without TD):
      'td'            build_weights of the value head's TD errors
      'uniform'       the loss mask (the baseline plus a value loss)
      'random'        the population's TD weights at random positions (random_like_weights)
      'shuffled'      each row's TD weights permuted within it (shuffle_within_rows)
      'oracle_prefix' 1 before the row's first wrong step, 0 from it on; correct rows all 1
      'oracle_td'     build_weights of a perfect prefix critic's TD errors (V = on_track)
      'reward'        w = R: correct rows only
    values are detached here; the 0/1 modes are normalised like TD weights (normalize); `reduce`
    as in build_weights. The controls draw from the device's global RNG (checkpoints restore it).

    values (B, L), rewards (B,), loss_mask (B, L), first_error (B,) -> ((B, L), (B, L) or None)
    """
    if weight_mode == "uniform":
        return loss_mask.float(), None
    if weight_mode in ("oracle_prefix", "reward"):
        w = (oracle_prefix_weights(loss_mask, first_error, rewards) if weight_mode == "oracle_prefix"
             else loss_mask.float() * rewards[:, None].float())
        return (normalize_weights(w, loss_mask, reduce) if normalize else w), None
    if weight_mode not in ("td", "random", "shuffled", "oracle_td"):
        raise ValueError(f"weight_mode {weight_mode!r}: use one of {', '.join(WEIGHT_MODES)}")
    v = on_track(first_error, loss_mask.shape[1]) if weight_mode == "oracle_td" else values.detach()
    td = compute_td_errors(v, rewards, loss_mask, gamma)  # (B, L)
    w = build_weights(td, loss_mask, beta, clip_min, clip_max, whiten, normalize, reduce)  # (B, L)
    if weight_mode == "random":
        w = random_like_weights(w, loss_mask, None)
    elif weight_mode == "shuffled":
        w = shuffle_within_rows(w, loss_mask, None)
    return w, td


# Controls for Stage 2's weight_mode: same weights, meaningless positions

def random_like_weights(weights, mask, generator):
    """
    Permute the weights of all valid tokens of the batch across all valid positions: the same
    multiset of weights, with any link to the tokens removed. 0 outside the mask.
    `generator` is a torch.Generator (its device is used for the permutation).

    A shuffle of the batch flattened into one row (shuffle_within_rows): no boolean indexing, so
    no host sync on a GPU.

    weights (B, L), mask (B, L) -> (B, L)
    """
    B, L = weights.shape
    return shuffle_within_rows(weights.reshape(1, B * L), mask.reshape(1, B * L), generator).view(B, L)


def shuffle_within_rows(weights, mask, generator):
    """
    Permute each row's weights among that row's valid tokens: every sequence keeps its own
    weights (and so its total), only the token each weight lands on is random. 0 outside the mask.

    weights (B, L), mask (B, L) -> (B, L)
    """
    m = mask.to(weights.device) > 0                      # (B, L)
    B, L = weights.shape
    dev = generator.device if generator is not None else weights.device
    keys = torch.rand(B, L, generator=generator, device=dev).to(weights.device)
    keys = torch.where(m, keys, 2.0)                     # valid first, in random order
    src = keys.argsort(dim=1)                            # (B, L) positions to read from
    dst = (~m).to(torch.int8).argsort(dim=1, stable=True)  # (B, L) valid positions in order, then the rest
    count = m.sum(dim=1, keepdim=True)                   # (B, 1)
    j = torch.arange(L, device=weights.device).expand(B, L)
    vals = torch.where(j < count, weights.gather(1, src), torch.zeros_like(weights))
    return torch.zeros_like(weights).scatter(1, dst, vals)


# -----------------------------------------------------------------------------
# Stage 3: Rho-1 selection

def select_top_k(scores, valid, k_percent):
    """
    Rho-1's selection for one head: the ceil(k_percent * n_valid) valid entries with the largest
    score (over the whole tensor) get 1, every other entry 0. Ties are broken by the lowest flat
    index (stable sort), so the result is deterministic; ceil uses a 1e-6 tolerance so float noise
    never adds an entry (k_percent=0.81, n=1200 selects 972, not 973). No host sync.

    scores (B, L), valid (B, L) -> (B, L) float32 in {0, 1}
    """
    if not (0 < k_percent <= 1):
        raise ValueError(f"k_percent must be in (0, 1], got {k_percent}")
    s = scores.detach().float().flatten()                # (N,)
    v = (valid.to(s.device) > 0).flatten()               # (N,)
    # order: valid entries first, by descending score, ties by flat index (two stable sorts)
    order = s.sort(descending=True, stable=True).indices
    order = order[v[order].to(torch.int32).sort(descending=True, stable=True).indices]
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(s.numel(), device=s.device))
    return (rank < n_selected(v.sum(), k_percent)).float().view_as(scores)


def n_selected(n_valid, k_percent):
    """How many of n_valid targets select_top_k keeps: ceil(k_percent * n_valid), 1e-6 tolerance.
    Known from the masks alone, so a script can normalise by it before the forward."""
    return torch.ceil(k_percent * torch.as_tensor(n_valid).double() - 1e-6)


def compute_mtp_selective_weights(excess_loss, mask, k_percent=0.6):
    """
    Rho-1 per-head token selection. excess[b,t,k] = ce_policy - ce_reference.

      head 0:      w = mask (every valid target)
      head k >= 1: select_top_k(excess[..., k], mask[..., k], k_percent): the ceil(k_percent *
                   n_valid_k) valid targets of that head with the largest excess loss in the
                   whole tensor (over B and L) get 1, the rest 0.

    excess_loss (B, L, n), mask (B, L, n) -> (B, L, n) float32 in {0, 1}
    """
    m = mask.to(excess_loss.device) > 0                  # (B, L, n)
    heads = [m[..., 0].float()] + [select_top_k(excess_loss[..., k], m[..., k], k_percent)
                                   for k in range(1, excess_loss.shape[-1])]
    return torch.stack(heads, dim=-1)


# -----------------------------------------------------------------------------
# Aligning token-level quantities with the MTP heads

def shift_to_heads(x, n):
    """
    Token-level values to (position, head) pairs: head k at position t predicts token t+k+1, so
    it takes that token's value. out[b,t,k] = x[b, t+k+1], 0 past the end. On the loss mask this
    is which heads have a completion target where; on token weights, each head's weights.

    x (B, L) -> (B, L, n), same dtype
    """
    B, L = x.shape
    padded = torch.cat([x, x.new_zeros(B, n)], dim=1)    # (B, L+n)
    return padded.unfold(1, n, 1)[:, 1:L + 1]            # windows starting at t+1: (B, L, n)


# -----------------------------------------------------------------------------
# Losses

def value_mask(loss_mask):
    """
    Positions that train the value head: the last prompt position (its V is the estimate
    before any completion token, the V[b, first-1] of the TD errors) and every completion
    position. out[b,t] = mask[b,t] or mask[b,t+1].

    loss_mask (B, L) -> (B, L), same dtype
    """
    m = loss_mask > 0
    m_next = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
    return (m | m_next).to(loss_mask.dtype)


def value_loss(values, targets, vmask, count=None):
    """
    Squared error of the value head against its target, over the value positions:
      sum(vmask * (V - target)^2) / count
    targets: the sample's reward R (B,) (the terminal target), or a target per position (B, L)
    (e.g. on_track: the prefix critic's). count: the normaliser; None = max(sum(vmask), 1), this
    batch's mean. The training scripts pass the optimizer step's count over all micro-batches and
    ranks (one gradient for any split).

    values (B, L), targets (B,) or (B, L), vmask (B, L) -> scalar float32
    """
    V = values.float()
    vm = vmask.to(V.device).float()
    target = targets.to(V.device).float()
    err = (V - (target[:, None] if target.dim() == 1 else target)) ** 2
    return (vm * err).sum() / (vm.sum().clamp_min(1.0) if count is None else count)


# -----------------------------------------------------------------------------
# Critic validation metrics

def auc(scores, labels):
    """
    ROC AUC = P(score of a random positive > score of a random negative), ties counted 1/2
    (Mann-Whitney U from average ranks). labels > 0.5 are positives. NaN if either class is
    empty. scores, labels: any shape, flattened -> float
    """
    s = torch.as_tensor(scores).detach().flatten().double()
    y = torch.as_tensor(labels).detach().flatten().to(s.device) > 0.5
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)  # sorted unique
    ends = counts.cumsum(0).double()                     # 1-based rank of each group's last member
    avg_rank = ends - (counts.double() - 1) / 2          # (G,) average rank of tied members
    rank_sum = avg_rank[inverse][y].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_accuracy(scores, labels, threshold=0.5):
    """Fraction of samples where (score >= threshold) == (label > 0.5); NaN if empty. -> float"""
    s = torch.as_tensor(scores).detach().flatten()
    y = torch.as_tensor(labels).detach().flatten().to(s.device) > 0.5
    if s.numel() == 0:
        return math.nan
    return ((s >= threshold) == y).float().mean().item()
