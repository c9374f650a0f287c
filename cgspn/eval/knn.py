"""Weighted kNN classification of frozen features (as in DINO). Shapes: [N, D] features, int64 [N] labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cgspn.eval.protocol import Context, Protocol, round4
from cgspn.pipeline.errors import ParamError


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


class KNN(Protocol):
    """kNN top-1 where the data has labels: the query split's images against the bank split's, by the model's
    own summary vector, by the adaptor's summary where there is one, and by the mean of the patch tokens.
    Params: knn_bank_split, knn_query_split (auto: train / val), knn_k, knn_temperature."""

    name = "knn"
    title = "kNN"

    def prepare(self, ctx: Context) -> str | None:
        p, splits = ctx.p, ctx.splits
        knn = [p["knn_bank_split"], p["knn_query_split"]]
        if knn == ["auto", "auto"] and not (splits.has("train", "labels") and
                                            any(splits.has(s, "labels") for s in ("val", "test"))):
            ctx.used[self.name] = None
            return "the data has no labels (kNN needs a labelled train and val split)"
        knn = [splits.resolve(knn[0], lambda _: "train", "evaluate.knn_bank_split"),
               splits.resolve(knn[1], splits.val, "evaluate.knn_query_split")]
        for param, split in zip(("knn_bank_split", "knn_query_split"), knn):
            if not splits.has(split, "labels"):
                raise ParamError(f"evaluate.{param}={split!r}: no such split with labels (splits: {splits.names})")
        ctx.used[self.name] = tuple(knn)
        return None

    def empty(self) -> dict:
        return {"knn_summary": None, "knn_summary_adapted": None, "knn_mean_patch": None}

    def measure(self, ctx: Context, model: str) -> dict:
        bank, query = ctx.used[self.name]
        b, q = (ctx.store.outputs(model, s, ctx.base) for s in (bank, query))
        labels = [ctx.store.labels(s) for s in (bank, query)]
        knn = lambda a, c: knn_top1(a, labels[0], c, labels[1], ctx.p["knn_k"], ctx.p["knn_temperature"])  # noqa: E731
        adapted = ctx.encoders[model].adaptor is not None
        # the model's own summary vector (every model has one); for students with an adaptor also the
        # adaptor's prediction of the teacher's summary
        return {"knn_summary": round4(knn(b.own_summary, q.own_summary)),
                "knn_summary_adapted": round4(knn(b.summary, q.summary)) if adapted else None,
                "knn_mean_patch": round4(knn(b.patches.mean((1, 2)), q.patches.mean((1, 2))))}

    def line(self, r: dict) -> list[str]:
        if r.get("knn_summary") is None:
            return []
        adapted = f" (adapted {r['knn_summary_adapted']:.3f})" if r.get("knn_summary_adapted") is not None else ""
        return [f"kNN summary {r['knn_summary']:.3f}{adapted}, mean-patch {r['knn_mean_patch']:.3f}"]
