"""
Validation on token data, shared by the four stages (every eval_interval) and eval.py: each head's
cross-entropy and top-1 accuracy on its completion targets, and the value head's squared error,
accuracy and AUC. Everything is a sum over this process's batches first, so ranks and batches
combine exactly (a mean is taken once, at the end, never a mean of per-rank means).
"""

import torch
import torch.distributed as dist

import ddp_utils
from weighting import auc, binary_accuracy, shift_to_heads, value_mask


@torch.no_grad()
def eval_sums(model, batches, device, autocast, heads: bool = True, value: bool = False):
    """Validation sums of this process over `batches`: per head (ce_sum, n_targets, n_top1_correct)
    as (3, n) over completion targets; the value head's squared-error sum and count over the value
    positions (2,); and V at each row's last token with the row's label (CPU vectors, for accuracy
    and AUC)."""
    n, device = model.n_future_tokens, torch.device(device)
    acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sums = torch.zeros(3, n, dtype=acc, device=device)  # ce_sum, count, correct per head
    vsums = torch.zeros(2, dtype=acc, device=device)  # squared error sum, count
    last_values, labels = [], []
    for batch in batches:
        tokens = batch["input_ids"].to(device)
        loss_mask = batch["loss_mask"].to(device)
        with autocast:
            h = model.trunk_forward(tokens)  # (B, L, dim)
            if heads:
                sums += torch.stack(model.head_eval_sums(tokens, shift_to_heads(loss_mask, n), h_trunk=h))
        if value:
            v = model.value(h)  # (B, L) fp32
            reward = batch["reward"].to(device)
            vm = value_mask(loss_mask).to(acc)
            vsums += torch.stack([(vm * (v.to(acc) - reward.to(acc)[:, None]) ** 2).sum(), vm.sum()])
            last = (batch["lengths"] - 1).to(device)  # (B,) the last completion token (eos unless truncated)
            last_values.append(v.gather(1, last[:, None]).squeeze(1).cpu())
            labels.append(batch["reward"])
    scores = torch.cat(last_values) if last_values else torch.zeros(0)
    ys = torch.cat(labels) if labels else torch.zeros(0)
    return sums, vsums, scores, ys


@torch.no_grad()
def evaluate_all_ranks(model, loader, ctx, autocast, heads: bool = True, value: bool = False) -> dict:
    """Validation metrics over every rank's shard of `loader`. A collective: every rank calls it
    (its sums are all-reduced, the value scores gathered for the AUC) and gets the same metrics.
    heads: per-head CE and top-1 accuracy over completion targets; val/loss = their mean over heads.
    value: value MSE over the value positions, and accuracy/AUC of V at the last token vs the label
    (val/loss = the MSE when heads=False)."""
    model.eval()
    sums, vsums, scores, ys = eval_sums(model, loader, ctx.device, autocast, heads, value)
    metrics = {}
    if heads:
        ddp_utils.all_reduce_sum(sums)
        head_loss = (sums[0] / sums[1].clamp(min=1)).tolist()
        metrics.update({"val/loss": sum(head_loss) / len(head_loss), "val/head_loss": head_loss,
                        "val/head_acc": (sums[2] / sums[1].clamp(min=1)).tolist()})
    if value:
        ddp_utils.all_reduce_sum(vsums)
        if ctx.ddp:  # AUC needs every sample: gather the (small, uneven) per-sample vectors
            gathered = [None] * ctx.world_size
            dist.all_gather_object(gathered, (scores, ys))
            scores, ys = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
        metrics.update({"val/value_mse": (vsums[0] / vsums[1].clamp(min=1)).item(),
                        "val/value_acc": binary_accuracy(scores, ys), "val/value_auc": auc(scores, ys)})
        if not heads:
            metrics["val/loss"] = metrics["val/value_mse"]
    model.train()
    return metrics
