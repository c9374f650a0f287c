"""A new evaluation is one Protocol in one file: registered, it runs in the evaluate stage over the shared
feature store, its figures land in evaluate.json, its reason under not_measured where it cannot run, and its
section in REPORT.md. The toy protocol here measures the mean norm of each model's own patch tokens."""
from __future__ import annotations

import json

import pytest

from cgspn.eval.protocol import Context, Protocol, protocols, register, unregister
from micro import copy_root, run, write_params

UNTRAINED = {"evaluate__models": ["teacher", "random"], "evaluate__pca_model": "random",
             "evaluate__seg_scales": [1], "evaluate__pca_sizes": [56]}


class TokenNorm(Protocol):
    """Toy: the mean L2 norm of each model's own patch tokens on the validation split at the base side."""

    name = "token_norm"

    def prepare(self, ctx: Context) -> str | None:
        self.split = ctx.splits.val("evaluate (token norm)")
        ctx.used[self.name] = self.split
        return None

    def measure(self, ctx: Context, model: str) -> dict:
        tokens = ctx.store.outputs(model, self.split, ctx.base).patches
        return {"token_norm": round(tokens.norm(dim=-1).mean().item(), 4)}

    def line(self, r: dict) -> list[str]:
        return [f"token norm {r['token_norm']:.2f}"]

    def report_lines(self, ev: dict, names: dict[str, str]) -> list[str]:
        return ["### Token norms", ""] + [f"- {names.get(m, m)}: {r['token_norm']:.2f}" for m, r in ev["models"].items()
                                          if "token_norm" in r] + [""]


class NeedsCaptions(Protocol):
    name = "captions"

    def prepare(self, ctx: Context) -> str | None:
        return "the data has no captions"


@pytest.fixture
def toy():
    protocols_before = [p.name for p in protocols()]
    register(TokenNorm())
    register(NeedsCaptions())
    yield protocols_before
    unregister("token_norm")
    unregister("captions")


def test_a_registered_protocol_runs_in_evaluate_and_shows_in_the_report(micro, tmp_path, toy, capsys):
    from cgspn.report.build import build_report

    assert [p.name for p in protocols()] == toy + ["token_norm", "captions"]
    with pytest.raises(ValueError, match="already registered"):
        register(TokenNorm())
    root = copy_root(micro["root"], tmp_path / "root")
    params = write_params(root / "params.yaml", **UNTRAINED)
    ev = run("evaluate", params, root)
    assert ev == json.loads((root / "reports/metrics/evaluate.json").read_text())
    assert ev["splits"]["token_norm"] == "val" and ev["not_measured"]["captions"] == "the data has no captions"
    # the toy figure of each model, next to the built-in ones, from the same forward passes
    from cgspn.eval.features import Encoder, FeatureStore
    from cgspn.teachers.registry import load_vit

    teacher = Encoder("teacher", load_vit(root / "models/teachers/dinov2_vits14_imgfocus.safetensors"))
    expected = FeatureStore(root, root / "data/shards", {"teacher": teacher}, 8, None).outputs(
        "teacher", "val", ev["resolution"]).patches.norm(dim=-1).mean().item()
    assert ev["models"]["teacher"]["token_norm"] == pytest.approx(expected, rel=2e-3)  # the cache holds float16
    assert ev["models"]["random"]["token_norm"] > 0 and "knn_summary" in ev["models"]["random"]
    assert "token norm" in capsys.readouterr().out
    report = build_report(root, None, params.read_text())
    assert "### Token norms" in report and f"{ev['models']['random']['token_norm']:.2f}" in report


def test_the_protocols_of_a_plain_evaluate_are_the_built_in_ones():
    assert [p.name for p in protocols()] == ["knn", "seg", "fidelity", "imagenet_readout"]
    unregister("knn")  # built-in protocols are not removed by name
    assert [p.name for p in protocols()] == ["knn", "seg", "fidelity", "imagenet_readout"]
