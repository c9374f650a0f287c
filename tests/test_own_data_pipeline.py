"""The whole pipeline on four data sets of the researcher's own kind (tests/own_data_sets.py, real photos,
not Fashion-MNIST): an image folder (labels), a CSV table with captions, labels and label maps, the
ADE20K segmentation layout (label maps, no labels), and img2dataset webdataset shards read in place from a
brace pattern (JPEGs, captions, metadata, labels, some samples failed; benchmarks/img2dataset_shards.py).
Only `shard.source` and `shard.path` change; every split parameter stays `auto`. The table (labels,
captions and masks: every split and measure) and the shards (training reads them by byte range where they
lie) run shard -> cache_teacher -> the three training stages -> evaluate -> report with reduced steps; the folder and the
segmentation layout, whose differences end at the data (training reads shards and features alike), run
shard -> cache_teacher -> evaluate (teacher and random student) -> report. One local Ray serves all stages
(the teacher is the micro fixture's, converted once; benchmark does not depend on the data). The report
has the sections the data allows and says what it could not measure."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.img2dataset_shards import write_shards
from micro import TRAIN_STAGES, copy_tree, run, write_params
from own_data_sets import make_folder, make_segmentation, make_table

STAGES = ["shard", "cache_teacher", "distill_stage1", "distill_stage2", "highres", "evaluate", "report"]
TRAINED = "table"  # the data set whose training the tests below look into
TRAINS = (TRAINED, "webdataset")  # the data sets that go through the training stages too
UNTRAINED = {"evaluate__models": ["teacher", "random"], "evaluate__pca_model": "random"}
DATASETS = {
    "folder": ("folder", lambda d: make_folder(d, n=24)),
    "table": ("table", lambda d: make_table(d, "csv", n=24, masks=True)),
    "segmentation": ("segmentation", lambda d: make_segmentation(d, n_train=16, n_val=8)),
    "webdataset": ("webdataset", lambda d: str(write_shards(d, 28, 8, side=48, labels=True, failed_every=9)[0].parent)
                   + "/{00000..00003}.tar"),
}
FAST = {"steps": 2, "checkpoint_every": 2, "val_count": 4, "workers": 1}


@pytest.fixture(scope="module")
def own_runs(micro, tmp_path_factory):
    """{name: root} after the whole pipeline ran on each data set."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, log_to_driver=False, include_dashboard=True)
    roots = {}
    try:
        for name, (source, build) in DATASETS.items():
            base = tmp_path_factory.mktemp(f"own-{name}")
            data = build(base / "data-in")
            root = base / "root"
            copy_tree(micro["root"] / "models/teachers", root / "models/teachers")
            changes = {"shard__source": source, "shard__path": str(data), "evaluate__seg_steps": 8,
                       **{f"{stage}__{k}": v for stage in ("distill_stage1", "distill_stage2")
                          for k, v in FAST.items()}, **({} if name in TRAINS else UNTRAINED)}
            params = write_params(base / "params.yaml", **changes)
            for stage in STAGES:
                if name in TRAINS or stage not in TRAIN_STAGES:
                    run(stage, params, root)
            roots[name] = root
    finally:
        if started:
            ray.shutdown()
    return roots


def evaluation(root: Path) -> dict:
    return json.loads((root / "reports/metrics/evaluate.json").read_text())


def test_every_stage_ran_through_the_report_on_each_data_set(own_runs):
    for name, root in own_runs.items():
        trained = name in TRAINS
        for stage in TRAIN_STAGES:
            assert (root / "models" / stage / "student.safetensors").exists() == trained, (name, stage)
        report = (root / "reports/REPORT.md").read_text()
        assert "## How good the features are" in report and ("## Distillation" in report or not trained), name
        assert "Fashion-MNIST" not in report, name  # nothing of the demo data leaks into a report of other data
        ev = evaluation(root)
        assert all(abs(v - 1) < 1e-5 for v in ev["models"]["teacher"]["fidelity"].values())
        assert sorted(ev["models"]["highres" if trained else "random"]["fidelity"]) == sorted(
            str(ev["resolution"] * s) for s in (1, 2))


def test_what_the_data_allows_is_measured_and_the_rest_is_named(own_runs):
    expect = {"folder": (True, False), "table": (True, True), "segmentation": (False, True), "webdataset": (True, False)}
    for name, (knn, seg) in expect.items():
        ev, report = evaluation(own_runs[name]), (own_runs[name] / "reports/REPORT.md").read_text()
        teacher = ev["models"]["teacher"]
        assert (teacher["knn_summary"] is not None) == knn and bool(teacher["seg_miou"]) == seg, name
        assert ("kNN: not measured: the data has no labels" in report) == (not knn), name
        assert ("Segmentation: not measured: the data has no masks" in report) == (not seg), name
        assert set(ev["not_measured"]) == ({"knn"} if not knn else set()) | ({"seg"} if not seg else set()) | {
            "imagenet_readout"}  # one teacher, the ViT: no ImageNet classifier to read out through
        if knn and name != "webdataset":  # four photos, each crop labelled by its photo: the teacher tells them apart
            assert teacher["knn_summary"] > 0.5 and "kNN top-1, summary (%)" in report
        if seg:  # on the data's own label maps at 1x and 2x, the ignore label (0) not scored
            assert ev["splits"]["seg"] == ["train", "val"] and len(teacher["seg_miou"]) == 2
            assert all(0.0 <= v <= 1.0 for v in teacher["seg_miou"].values())


def test_highres_trains_on_the_sources_own_images_when_there_are_no_bigger_mosaics(own_runs):
    highres = json.loads((own_runs[TRAINED] / "reports/metrics/highres.json").read_text())
    assert highres["steps"] > 0 and any(k.endswith("/56px") for k in highres["val_end"])
