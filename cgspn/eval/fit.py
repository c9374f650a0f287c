"""A fixed budget of optimizer steps: the one training recipe of every probe and readout head."""
from __future__ import annotations

import torch
from torch import nn


def fit_fixed_steps(model: nn.Module, batch_loss, n: int, steps: int, batch_size: int, lr: float,
                    weight_decay: float, seed: int) -> nn.Module:
    """Train `model` for `steps` optimizer steps (AdamW, cosine learning-rate decay to 0) through shuffled
    passes over n items, drawn by a generator seeded with `seed`; `batch_loss(idx)` gives the scalar loss of
    the items idx (int64 [<= batch_size]). Returns the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < steps:
        for idx in torch.randperm(n, generator=gen).split(batch_size)[: steps - step]:
            loss = batch_loss(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    return model.eval()
