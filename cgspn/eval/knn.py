"""Weighted kNN classification of frozen features (as in DINO). Shapes: [N, D] features, int64 [N] labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN (as in DINO): L2-normalized features, the k most similar bank entries vote for their
    label with weight exp(similarity / temperature). Returns top-1 accuracy in [0, 1]."""
    bank = F.normalize(bank.float(), dim=1)
    classes = int(max(bank_labels.max(), query_labels.max())) + 1
    correct = 0
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start : start + chunk].float(), dim=1)
        sims, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(q), classes).scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == query_labels[start : start + chunk]).sum().item()
    return correct / len(queries)
