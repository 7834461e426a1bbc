"""Training one LoRA block on one edit, with the frozen lower layers computed only once."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .backbone import Backbone, Encoded
from .config import MeloConfig
from .lora import ActiveBlocks


@dataclass
class Trained:
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]   # module -> (A, B * alpha / rank)
    losses: list[float]
    token_accuracy: float
    params: int


def new_block(backbone: Backbone, modules: list[str], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fresh (A, B) per module: A small random, B zero, so the untrained block is a no-op.
    Drawn on the CPU (the same block on every device), trained where the model runs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        layer = backbone.loras[m]
        a = torch.randn(rank, layer.in_features, generator=g) / math.sqrt(layer.in_features)
        b = torch.zeros(layer.out_features, rank)
        out[m] = (a.to(backbone.device).requires_grad_(), b.to(backbone.device).requires_grad_())
    return out


def train_block(
    backbone: Backbone,
    enc: Encoded,
    modules: list[str],
    cfg: MeloConfig,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    start_from: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Trained:
    """Fit a new block so the model, given enc's prompt, produces enc's target tokens.

    enc holds one prompt followed by its target; the loss covers the target tokens only.
    `start_from` continues training an existing block (as stored: B already scaled) instead
    of a fresh one: the plain-LoRA baseline trains one adapter on every edit in turn.
    """
    # The backbone says how its kind of model is taught a target (a decoder: the target
    # after the prompt; an encoder-decoder: the target as the decoder's labels).
    loss_of = backbone.teacher(enc, min(cfg.lora_layers))
    return fit_block(backbone, modules, cfg, loss_of, seed, progress, start_from)


def fit_block(backbone, modules: list[str], cfg: MeloConfig,
              loss_of: Callable[[dict[str, ActiveBlocks]], tuple[torch.Tensor, float]], seed: int = 0,
              progress: Callable[[int, float], None] | None = None,
              start_from: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Trained:
    """The training loop of one block, whatever it learns: `loss_of(active)` runs the model
    with the block held and returns (loss, accuracy); Adam on the block alone, step decay,
    stop once the accuracy is 1 and the loss under cfg.stop_loss. `start_from` continues an
    existing block (as stored: B already scaled) instead of a fresh one."""
    scale = cfg.lora_alpha / cfg.rank_per_block
    if start_from is None:
        block = new_block(backbone, modules, cfg.rank_per_block, seed)
    else:
        block = {m: (a.to(backbone.device).clone().requires_grad_(), (b.to(backbone.device) / scale).requires_grad_())
                 for m, (a, b) in start_from.items()}
    params = [t for pair in block.values() for t in pair]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    # Step decay: halve the rate for the second half of the budget.
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.max_iters // 2), gamma=0.5)
    keep = torch.ones(1, dtype=torch.bool, device=backbone.device)
    losses, acc = [], 0.0
    for step in range(cfg.max_iters):
        active = {m: ActiveBlocks(a=a[None], b=(b * scale)[None], keep=keep) for m, (a, b) in block.items()}
        loss, acc = loss_of(active)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
        # Stop once greedy decoding would reproduce the target with some margin to spare.
        if acc == 1.0 and losses[-1] < cfg.stop_loss:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    # Kept in CPU memory, like every block of a bank.
    matrices = {m: (a.detach().cpu().clone(), (b * scale).detach().cpu().clone()) for m, (a, b) in block.items()}
    return Trained(matrices, losses, acc, sum(p.numel() for p in params))
