"""
Validation on token data, shared by the four stages (every eval_interval) and eval.py: each head's
cross-entropy and top-1 accuracy on its completion targets, and the value head's squared error,
accuracy and AUC. Everything is a sum over this process's batches first, so ranks and batches
combine exactly (a mean is taken once, at the end, never a mean of per-rank means).
"""

import torch
import torch.distributed as dist

import ddp_utils
from weighting import auc, binary_accuracy, on_track, shift_to_heads, value_mask


@torch.no_grad()
def eval_sums(model, batches, device, autocast, heads: bool = True, value: bool = False, value_target: str = "reward",
              step_labels: bool = False) -> dict:
    """Validation sums of this process over `batches`:
    "heads" (3, n): per head (ce_sum, n_targets, n_top1_correct) over completion targets;
    "value" (2,): the value head's squared-error sum and count over the value positions, against R
      (value_target='reward') or the prefix target (1 before the row's first wrong step, 'prefix');
    "last_v", "labels": V at each row's last token and the row's label (CPU vectors, for accuracy/AUC);
    "token_v", "on_track" (step_labels only): V at every value position and whether the prefix up to
      it is still right (CPU vectors, for the token-level AUC of a prefix-aware critic)."""
    n, device = model.n_future_tokens, torch.device(device)
    acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sums = torch.zeros(3, n, dtype=acc, device=device)  # ce_sum, count, correct per head
    vsums = torch.zeros(2, dtype=acc, device=device)  # squared error sum, count
    out = {"last_v": [], "labels": [], "token_v": [], "on_track": []}
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
            prefix_ok = on_track(batch["first_error"].to(device), tokens.shape[1])  # (B, L)
            target = prefix_ok if value_target == "prefix" else reward[:, None]
            vm = value_mask(loss_mask).to(acc)
            vsums += torch.stack([(vm * (v.to(acc) - target.to(acc)) ** 2).sum(), vm.sum()])
            last = (batch["lengths"] - 1).to(device)  # (B,) the last completion token (eos unless truncated)
            out["last_v"].append(v.gather(1, last[:, None]).squeeze(1).cpu())
            out["labels"].append(batch["reward"])
            if step_labels:
                at = vm > 0
                out["token_v"].append(v[at].cpu())
                out["on_track"].append(prefix_ok[at].cpu())
    out = {k: torch.cat(x) if x else torch.zeros(0) for k, x in out.items()}
    return {"heads": sums, "value": vsums, **out}


@torch.no_grad()
def evaluate_all_ranks(model, loader, ctx, autocast, heads: bool = True, value: bool = False,
                       value_target: str = "reward") -> dict:
    """Validation metrics over every rank's shard of `loader`. A collective: every rank calls it
    (its sums are all-reduced, the value scores gathered for the AUC) and gets the same metrics.
    heads: per-head CE and top-1 accuracy over completion targets; val/loss = their mean over heads.
    value: value MSE over the value positions (against value_target's target), and accuracy/AUC of
    V at the last token vs the label (val/loss = the MSE when heads=False); on data with step labels
    also val/value_token_auc, V at every position for on-track vs off-track prefixes."""
    model.eval()
    step_labels = value and getattr(loader.dataset, "has_step_labels", False)
    s = eval_sums(model, loader, ctx.device, autocast, heads, value, value_target, step_labels)
    metrics = {}
    if heads:
        ddp_utils.all_reduce_sum(s["heads"])
        head_loss = (s["heads"][0] / s["heads"][1].clamp(min=1)).tolist()
        metrics.update({"val/loss": sum(head_loss) / len(head_loss), "val/head_loss": head_loss,
                        "val/head_acc": (s["heads"][2] / s["heads"][1].clamp(min=1)).tolist()})
    if value:
        ddp_utils.all_reduce_sum(s["value"])
        vectors = ("last_v", "labels", "token_v", "on_track")
        if ctx.ddp:  # AUCs need every sample: gather the (uneven) per-sample vectors
            gathered = [None] * ctx.world_size
            dist.all_gather_object(gathered, [s[k] for k in vectors])
            s.update({k: torch.cat([g[i] for g in gathered]) for i, k in enumerate(vectors)})
        metrics.update({"val/value_mse": (s["value"][0] / s["value"][1].clamp(min=1)).item(),
                        "val/value_acc": binary_accuracy(s["last_v"], s["labels"]),
                        "val/value_auc": auc(s["last_v"], s["labels"])})
        if step_labels:
            metrics["val/value_token_auc"] = auc(s["token_v"], s["on_track"])
        if not heads:
            metrics["val/loss"] = metrics["val/value_mse"]
    model.train()
    return metrics
