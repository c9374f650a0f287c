"""The training stages on the micro configuration (distill_stage1 -> distill_stage2 -> highres, run by the
Prefect flow in conftest.flow_run) on Ray Train with 2 CPU workers: their outputs and MLflow logs; a run killed part-way
and started again resumes from its last checkpoint and ends at the same final step; bad input."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cgspn.models.students import load_adaptors, load_student
from cgspn.teachers.registry import load_vit
from micro import MICRO, TRAIN_STAGES, copy_root, expect_exit, stage_run, write_params

REPO = Path(__file__).resolve().parents[1]


def test_each_stage_writes_a_student_that_runs_and_its_reports(trained):
    root = trained["root"]
    for stage in TRAIN_STAGES:
        student = load_student(root / "models" / stage / "student.safetensors")
        out = student(torch.randn(1, 3, 42, 56))
        assert out.patch_tokens.shape == (1, 3, 4, 384) and torch.isfinite(out.summary).all()
        metrics = json.loads((root / "reports/metrics" / f"{stage}.json").read_text())
        steps = trained["metrics"][stage]["steps"]
        assert metrics["steps"] == steps and "images_per_s" not in metrics and "seconds" not in metrics
        timings = json.loads((root / "reports/timings" / f"{stage}.json").read_text())
        assert timings["images_per_s"] > 0 and timings["seconds"] > 0
        rows = (root / "reports/plots" / f"{stage}.csv").read_text().splitlines()
        assert rows[0].startswith("step,loss") and [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, steps + 1))
        assert (root / "reports/plots" / f"{stage}.png").stat().st_size > 10_000
    for stage in ["distill_stage2", "highres"]:  # the flow's run distills from both teachers
        adaptors = load_adaptors(root / "models" / stage / "adaptors.safetensors")
        assert list(adaptors) == ["dinov2_vits14_imgfocus", "efficientnet_lite0"]


def test_stage1_trains_only_the_mixers(trained):
    root = trained["root"]
    teacher = load_vit(root / "models/teachers/dinov2_vits14_imgfocus.safetensors").state_dict()
    student = load_student(root / "models/distill_stage1/student.safetensors").state_dict()
    shared = [k for k in student if k in teacher]
    assert len(shared) > 100 and all(torch.equal(student[k], teacher[k]) for k in shared)
    from cgspn.models.cgspn import cgspn_from_teacher_config

    torch.manual_seed(0)
    fresh = cgspn_from_teacher_config(load_vit(root / "models/teachers/dinov2_vits14_imgfocus.safetensors").cfg)
    mixers = [k for k in student if ".attn." in k]
    assert sum(not torch.equal(student[k], fresh.state_dict()[k]) for k in mixers) > len(mixers) // 2
    val = trained["metrics"]["distill_stage1"]
    assert val["val_end"]["loss"] < val["val_start"]["loss"]  # six steps already lower the block losses


def test_stage2_reports_fidelity_before_and_after(trained):
    m = trained["metrics"]["distill_stage2"]
    for key in ["dinov2_vits14_imgfocus/patch_cosine", "dinov2_vits14_imgfocus/patch_cosine_raw",
                "dinov2_vits14_imgfocus/summary_cosine", "dinov2_vits14_imgfocus/block5_cosine"]:
        assert -1 <= m["val_start"][key] <= 1 and -1 <= m["val_end"][key] <= 1
    assert "dinov2_vits14_imgfocus/patch_cosine/56px" in trained["metrics"]["highres"]["val_end"]
    # raw_weight is 1 in micro stage 2 and 0 in micro highres: the raw term is logged where it is on
    assert trained["metrics"]["distill_stage2"]["train_last10"]["dinov2_vits14_imgfocus/raw"] > 0
    assert not any(k.startswith("dinov2_vits14_imgfocus/raw") for k in trained["metrics"]["highres"]["train_last10"])


def test_the_raw_term_matches_the_students_own_tokens_to_the_teachers(trained):
    """The objective with raw_weight w adds w x (MSE of the student's own patch tokens against the teacher's,
    both PHI-S standardized) to the same objective without it, and that term's gradient reaches the
    student's blocks but not the adaptors."""
    from cgspn.data.subset import ShardSubset
    from cgspn.distill.tasks import AdaptedObjective, Stage2Task, cached_targets
    from cgspn.data.preprocess import to_batch
    from cgspn.distill.losses import spatial_loss
    from cgspn.pipeline.inputs import teachers_config

    root, t = trained["root"], "dinov2_vits14_imgfocus"
    p = {**MICRO["distill_stage2"]}
    cfg = {**teachers_config(p, root, "distill_stage2"), **{k: p[k] for k in ("spatial_weight", "summary_weight",
                                                                              "adaptor_hidden")},
           "init_student": str(root / "models/distill_stage2/student.safetensors")}
    model = Stage2Task.build(cfg)
    data = ShardSubset(root / "data/shards", ["val"], feature_dirs={t: Path(cfg["features"][t])},
                       feature_names=AdaptedObjective({**cfg, "raw_weight": 0.0}, "cpu").names)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:4]
    x = to_batch([data.images[i] for i in idx], cfg["resolution"], "cpu")
    targets = cached_targets(data.features, idx)
    without, parts0 = AdaptedObjective({**cfg, "raw_weight": 0.0}, "cpu").terms(model, x, targets)
    objective = AdaptedObjective({**cfg, "raw_weight": 2.5}, "cpu")
    with_raw, parts = objective.terms(model, x, targets)
    tokens = model["student"](x).patch_tokens
    phis = objective.phis[t]["spatial"]
    expected = spatial_loss(phis.standardize(tokens), phis.standardize(targets[t]["spatial"].float()))
    assert "raw" not in "".join(parts0) and parts[f"{t}/raw"] == pytest.approx(expected.item(), rel=1e-5)
    assert (with_raw - without).item() == pytest.approx(2.5 * expected.item(), rel=1e-4)
    only_raw = {**cfg, "raw_weight": 1.0, "spatial_weight": 0.0, "summary_weight": 0.0, "block_weight": 0.0}
    AdaptedObjective(only_raw, "cpu").terms(model, x, targets)[0].backward()
    assert model["student"].blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert all(q.grad is None or q.grad.abs().sum() == 0 for q in model["adaptors"].parameters())


def test_a_raw_weight_needs_a_teacher_of_the_students_width(micro, tmp_path, capsys):
    root = copy_root(micro["root"], tmp_path / "root")
    init = root / "models/distill_stage1"
    init.mkdir(parents=True)
    (init / "student.safetensors").write_bytes(b"")  # never read: the check comes first
    (init / "student.json").write_text(json.dumps({"dim": 768}))
    expect_exit(capsys, "distill_stage2", write_params(tmp_path / "p.yaml"), root,
                "distill_stage2.raw_weight=1.0 needs a teacher of the student's width 768")


def test_block_targets_train_their_own_heads(trained):
    """The micro stage 2 and highres also match the teacher's block 5 (cached for stage 2, online for
    highres) through a head of its own: its loss is logged, and highres (heads at the full learning rate)
    moves that head away from stage 2's."""
    assert trained["metrics"]["distill_stage2"]["train_last10"]["dinov2_vits14_imgfocus/block5"] > 0
    assert trained["metrics"]["highres"]["train_last10"]["dinov2_vits14_imgfocus/block5/56px"] > 0
    root = trained["root"]
    before = load_adaptors(root / "models/distill_stage2/adaptors.safetensors")["dinov2_vits14_imgfocus"]
    after = load_adaptors(root / "models/highres/adaptors.safetensors")["dinov2_vits14_imgfocus"]
    assert list(before.blocks) == list(after.blocks) == ["5"]
    assert not torch.equal(before.blocks["5"].fc2.weight, after.blocks["5"].fc2.weight)


def test_head_only_steps_freeze_the_backbone_then_release_it(trained):
    """Micro stage 2 trains its heads alone for 2 of its 6 steps, then everything: its backbone moves away
    from stage 1's. Micro highres is head-only for all its steps: its backbone (the whole student, summary
    head included) is stage 2's, bit for bit, although its backbone_lr_scale is 0.5; the adaptors move."""
    root = trained["root"]
    stage1, stage2, highres = (load_student(root / "models" / s / "student.safetensors").state_dict()
                               for s in TRAIN_STAGES)
    backbone = [k for k in stage2 if k.startswith(("patch_embed.", "blocks.", "norm."))]
    assert len(backbone) > 100
    assert all(torch.equal(highres[k], stage2[k]) for k in backbone)
    assert sum(not torch.equal(stage2[k], stage1[k]) for k in backbone) > len(backbone) // 2
    assert all(torch.equal(highres[k], stage2[k]) for k in stage2 if k.startswith("summary_head."))
    before, after = (load_adaptors(root / "models" / s / "adaptors.safetensors")["dinov2_vits14_imgfocus"]
                     for s in ("distill_stage2", "highres"))
    assert not torch.equal(before.summary.fc1.weight, after.summary.fc1.weight)


def test_the_backbone_schedule_starts_after_the_head_only_steps():
    from cgspn.train.loop import backbone_learning_rate, learning_rate

    opt = {"lr": 1e-3, "warmup_steps": 4, "steps": 100, "min_lr_ratio": 0.1, "head_only_steps": 30}
    assert [backbone_learning_rate(s, opt) for s in range(30)] == [0.0] * 30
    shifted = {**opt, "steps": 70}
    assert [backbone_learning_rate(30 + s, opt) for s in range(70)] == [learning_rate(s, shifted) for s in range(70)]
    assert backbone_learning_rate(30, opt) == 1e-3 / 4 and backbone_learning_rate(33, opt) == 1e-3
    assert backbone_learning_rate(99, {**opt, "head_only_steps": 0}) == learning_rate(99, opt)


def test_rank_zero_logs_every_step_to_mlflow(trained):
    import mlflow

    client = mlflow.MlflowClient(trained["tracking_uri"])  # the flow's database
    run_id = stage_run(trained, "distill_stage2").info.run_id
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 7))
    for name in ["lr", "images_per_s", "dinov2_vits14_imgfocus/spatial", "val/dinov2_vits14_imgfocus/patch_cosine"]:
        assert client.get_metric_history(run_id, name), name
    artifacts = [a.path for a in client.list_artifacts(run_id, "model")]
    assert "model/student.safetensors" in artifacts and "model/adaptors.safetensors" in artifacts


def code_copy(dest: Path) -> Path:
    """The pipeline's code (stages, cgspn, kernels) copied to `dest`: a stage run there runs that copy."""
    for sub in ("stages", "cgspn", "kernels"):
        shutil.copytree(REPO / sub, dest / sub, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def mlflow_runs(uri: str, key: str):
    """The MLflow runs of one Ray run key, oldest first."""
    import mlflow

    from cgspn.pipeline.tracking import RUN_KEY_TAG

    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`{RUN_KEY_TAG}` = '{key}'", order_by=["attributes.start_time ASC"])


def test_a_killed_run_resumes_and_a_code_change_starts_afresh(micro, tmp_path):
    """Killed after step 5 of 40 and started again, stage 1 resumes from its last checkpoint and ends at step
    40 with one history (40 steps: a step at 28 px takes ~0.1 s and the workers' lines reach the driver late
    under load, so a shorter run could end before the kill lands); MLflow marks the killed attempt failed and tags the new run as its continuation.
    Then a code-only change (the block loss) under the same parameters and inputs is a new Ray run: it
    does not restore the finished checkpoint, and it trains other weights."""
    code = code_copy(tmp_path / "code")
    root = copy_root(micro["root"], tmp_path / "root")
    params = write_params(tmp_path / "p.yaml", distill_stage1__steps=40, distill_stage1__checkpoint_every=2,
                          distill_stage1__workers=1)  # one worker: resuming is the same, the start quicker
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "stages.distill_stage1", "--params", str(params), "--root", str(root)]
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline, seen = time.time() + 240, ""
    try:
        for line in proc.stdout:
            seen += line
            if "step 5/40" in line or time.time() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and the training workers
        proc.wait()
    assert "step 5/40" in seen, seen[-3000:]
    assert not (root / "models/distill_stage1").exists()  # killed before the end: no output yet
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = re.findall(r"resumed from the checkpoint at step (\d+)", done.stdout + done.stderr)
    assert resumed and 2 <= int(resumed[0]) <= 38, done.stdout[-3000:]
    metrics = json.loads((root / "reports/metrics/distill_stage1.json").read_text())
    assert metrics["steps"] == 40
    rows = (root / "reports/plots/distill_stage1.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 41))  # one history, no step twice
    # MLflow: the killed attempt is FAILED (it was left RUNNING), the resumed run says what it continues
    key = re.search(r"distill_stage1-[0-9a-f]{16}", done.stdout + done.stderr).group(0)
    killed, resumed_run = mlflow_runs(uri, key)
    assert killed.info.status == "FAILED" and resumed_run.info.status == "FINISHED"
    assert resumed_run.data.tags["cgspn.resumes_run"] == killed.info.run_id
    assert resumed_run.data.tags["cgspn.resumed_from_step"] == resumed[0]
    first = load_student(root / "models/distill_stage1/student.safetensors").state_dict()

    losses = code / "cgspn/distill/losses.py"  # a code-only change: the block loss also penalizes the mean output
    losses.write_text(losses.read_text().replace(
        "def block_loss(pred: torch.Tensor, target: torch.Tensor, cosine_weight: float) -> torch.Tensor:",
        "def block_loss(pred: torch.Tensor, target: torch.Tensor, cosine_weight: float) -> torch.Tensor:\n"
        "    return _block_loss(pred, target, cosine_weight) + pred.mean().abs()\n\n\n"
        "def _block_loss(pred: torch.Tensor, target: torch.Tensor, cosine_weight: float) -> torch.Tensor:"))
    again = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from the checkpoint" not in again.stdout + again.stderr
    assert "step 1/40" in again.stdout + again.stderr  # trained from the start
    second = load_student(root / "models/distill_stage1/student.safetensors").state_dict()
    mixers = [k for k in first if ".attn." in k]
    assert any(not torch.equal(first[k], second[k]) for k in mixers)


def test_bad_training_input_is_one_line_before_ray_starts(trained, tmp_path, capsys, monkeypatch):
    """A split that does not exist, a NaN rate, a truncated shard, a feature shard without one of the image
    shard's keys: each is exit 2 with one line naming the parameter or the file, before Ray starts."""
    import ray
    import webdataset as wds

    from cgspn.data.shards import iter_samples

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # not the flow's database
    root = copy_root(trained["root"], tmp_path / "root",
                     ("data/shards", "data/features", "models/teachers", "models/distill_stage1", "models/distill_stage2"))
    expect_exit(capsys, "distill_stage1", write_params(tmp_path / "a.yaml", distill_stage1__splits=["train", "nope"]),
                root, "a.yaml: distill_stage1.splits: ", "no index for split 'nope'")
    expect_exit(capsys, "distill_stage2", write_params(tmp_path / "b.yaml", distill_stage2__lr=float("nan")), root,
                "b.yaml: distill_stage2.lr must be a finite number, got nan")
    expect_exit(capsys, "highres", write_params(tmp_path / "c.yaml", highres__val_splits=["val_x3"]), root,
                "c.yaml: highres.val_splits: ", "no index for split 'val_x3'")
    features = root / "data/features/dinov2_vits14_imgfocus/train-000001.tar"
    samples = list(iter_samples(features))
    with wds.TarWriter(str(features)) as sink:
        for sample in samples[:3] + samples[4:]:
            sink.write(sample)
    expect_exit(capsys, "distill_stage2", write_params(tmp_path / "d.yaml"), root,
                f"{features}: key {samples[4]['__key__']!r} where", f"has {samples[3]['__key__']!r}")
    shard = root / "data/shards/mosaic_train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    expect_exit(capsys, "distill_stage1", write_params(tmp_path / "e.yaml"), root, f"{shard}: ", "truncated")
    assert not ray.is_initialized()


def test_an_image_a_training_worker_cannot_decode_is_one_line_and_not_retried(micro, tmp_path):
    """The shard is a complete tar (the checks before Ray pass); a worker finds the image when a batch (or the
    validation) reads it: every worker stops at that step, the stage exits 2 with that error in one line, and Ray does not retry it (max_failures is 1).
    Another Ray instance runs on the machine meanwhile: the stage's own local Ray is unaffected, and Ray
    Train's helpers do not print "Found multiple active Ray instances" tracebacks (cgspn.pipeline.cluster pins
    RAY_ADDRESS in the job's workers)."""
    from micro import break_image, error_line
    from ray_nodes import ray_cluster

    root = copy_root(micro["root"], tmp_path / "root")
    key = break_image(root / "data/shards/train-000001.tar", 2)
    params = write_params(tmp_path / "p.yaml", distill_stage1__max_failures=1, distill_stage1__workers=1)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "stages.distill_stage1", "--params", str(params), "--root", str(root)]
    with ray_cluster(tmp_path / "another-ray", cpus=(1,)):
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Found multiple active Ray instances" not in done.stdout + done.stderr
    line = error_line(done.stderr, "distill_stage1")
    assert f"train-000001.tar: sample '{key}': image does not decode" in line, line
    assert (done.stdout + done.stderr).count("Attempting to start training worker group") == 1
    assert not list(root.glob("runs/ray/*/input-errors-*"))  # the workers' reports are gone once read
    assert not (root / "models/distill_stage1").exists()


def test_bad_training_parameters_are_named(micro, tmp_path, capsys):
    root = copy_root(micro["root"], tmp_path / "root")
    expect_exit(capsys, "distill_stage1", write_params(tmp_path / "a.yaml", distill_stage1__teacher="nope"), root,
                "distill_stage1.teacher='nope'")
    expect_exit(capsys, "distill_stage1", write_params(tmp_path / "b.yaml", distill_stage1__resolution=30), root,
                "distill_stage1.resolution=30")
    expect_exit(capsys, "distill_stage2", write_params(tmp_path / "c.yaml", distill_stage2__lr="fast"), root,
                "distill_stage2.lr must be float")
    expect_exit(capsys, "highres", write_params(tmp_path / "d.yaml", highres__batch_sizes=[2, 2]), root,
                "highres.batch_sizes needs one entry per scale")
    expect_exit(capsys, "distill_stage2", write_params(tmp_path / "e.yaml"), root, "distill_stage1/student.safetensors")
    expect_exit(capsys, "distill_stage2",
                write_params(tmp_path / "f.yaml", distill_stage2__block_targets={"dinov2_vits14_imgfocus": [7]}), root,
                "distill_stage2.block_targets.dinov2_vits14_imgfocus has blocks [7]", "cache_teacher.layers is [5]")
    expect_exit(capsys, "distill_stage2",
                write_params(tmp_path / "g.yaml", distill_stage2__block_targets={"nope": [5]}), root,
                "distill_stage2.block_targets names ['nope']")


@pytest.mark.parametrize("params_file", ["params.yaml", "params-full.yaml"])
def test_both_parameter_sets_pass_every_stage_schema(params_file):
    from cgspn.pipeline.params import load_section
    from micro import DATA_STAGES, stage_module

    for stage in DATA_STAGES + TRAIN_STAGES:
        load_section(REPO / params_file, stage, stage_module(stage).SCHEMA)


ADAPTED = ["distill_stage2", "highres"]  # the students that have adaptors


def test_evaluate_reads_the_teachers_cached_features_as_it_would_compute_them(trained):
    from cgspn.eval.features import Encoder, FeatureStore
    from cgspn.eval.models import cache_reader

    root = trained["root"]
    feature_dir = root / "data/features/dinov2_vits14_imgfocus"
    meta = json.loads((feature_dir / "meta.json").read_text())
    teacher = Encoder("teacher", load_vit(root / "models/teachers/dinov2_vits14_imgfocus.safetensors"), blocks=[5])
    computed = FeatureStore(root, root / "data/shards", {"teacher": teacher}, 8, None).outputs("teacher", "val",
                                                                                               meta["resolution"])
    cached = cache_reader(root, feature_dir, meta, None)("val", meta["resolution"], [5])
    for field in ("summary", "own_summary", "patches", "teacher_space", "blocks"):
        c, f = getattr(computed, field), getattr(cached, field)
        assert c.shape == f.shape, field
        torch.testing.assert_close(f, c, rtol=1e-2, atol=2e-2)  # the cache holds float16
    assert cache_reader(root, feature_dir, meta, None)("val", 2 * meta["resolution"], [5]) is None  # not cached


def test_evaluate_scores_every_model_against_the_teacher(trained):
    ev = json.loads((trained["root"] / "reports/metrics/evaluate.json").read_text())
    models = ev["models"]
    assert list(models) == ["teacher", "random", "distill_stage1", "distill_stage2", "highres"]
    sides = [str(ev["resolution"] * s) for s in (1, 2)]
    for name, r in models.items():
        for key in ["knn_summary", "knn_mean_patch"] + (["knn_summary_adapted"] if name in ADAPTED else []):
            assert 0.0 <= r[key] <= 1.0, (name, key)
        assert name in ADAPTED or r["knn_summary_adapted"] is None
        assert sorted(r["seg_miou"]) == sorted(sides) and all(0.0 <= v <= 1.0 for v in r["seg_miou"].values())
    # like for like: every model's own patch tokens against the teacher's (the teacher against itself: 1)
    assert all(abs(v - 1.0) < 1e-4 for v in models["teacher"]["fidelity"].values())
    assert all(sorted(r["fidelity"]) == sorted(sides) and all(-1.0 <= v < 0.999 for v in r["fidelity"].values())
               for name, r in models.items() if name != "teacher")
    # and, apart, the students' adaptor outputs, de-standardized; none for the models without adaptors
    assert all(-1.0 <= v < 0.999 for m in ADAPTED for v in models[m]["fidelity_adapted"].values())
    assert all(not models[m]["fidelity_adapted"] for m in models if m not in ADAPTED)
    # evaluate.teacher's per-teacher fidelity is the adapted fidelity above (the flow's run has both teachers: the
    # readout and the EfficientNet's fidelity are tests/test_imagenet_readout.py's)
    for m in ADAPTED:
        assert list(models[m]["fidelity_per_teacher"]) == ["dinov2_vits14_imgfocus", "efficientnet_lite0"]
        assert models[m]["fidelity_per_teacher"]["dinov2_vits14_imgfocus"]["patch"] == models[m]["fidelity_adapted"]
    # the teacher's block 5, the students' block target, is probed too
    assert sorted(models["teacher"]["seg_miou_blocks"]["5"]) == sorted(sides)
    assert all(0.0 <= v <= 1.0 for v in models["teacher"]["seg_miou_blocks"]["5"].values())
