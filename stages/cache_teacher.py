"""Stage `cache_teacher`: every teacher of models/teachers over the image shards, in parallel on Ray.

Writes data/features/<teacher>/<split>-NNNNNN.tar mirroring data/shards key by key (float16 summary,
spatial grid and the intermediate blocks `layers` names for it), PHI-S statistics over the features of `phis_splits`
(`phis.safetensors` for the spatial grid, `phis_summary.safetensors` for the summary vectors,
`phis_block<k>.safetensors` for each cached block) and `meta.json` beside them. A pool of `workers` actors, each loading
its teacher once; one job per shard (cgspn.pipeline.actor_jobs: a shard whose actor is lost runs again).

Every teacher sees the same images (the same resize and centre crop) with its own normalization, at
`teacher_scale[teacher]` x `resolution` (default 1): the student trains at `resolution`, and a CNN teacher
of stride 32 at scale 2 gives the student's 4 x 4 grid of 14-px patches at 56 px. meta.json records the
student's `resolution`, the teacher's own side (`teacher_resolution`), `scale`, `grid` and `dim`. Ray joins the cluster at RAY_ADDRESS when it is set
(cgspn.pipeline.cluster: local paths must then be on a file system every node sees), else starts locally.
An actor that dies with its node starts again on another and redoes its shard.

The same shards and teachers give byte-identical outputs however many workers finish in whatever order:
results are added up in job order. reports/metrics/cache_teacher.json holds only what the input decides;
times, rates and the nodes the workers ran on go to reports/timings/ (untracked) and MLflow.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import ray
from tqdm import tqdm

from cgspn.pipeline.actor_jobs import run_jobs
from cgspn.pipeline.cluster import check_resources, start_ray
from cgspn.data.feature_cache import in_order
from cgspn.data.locations import is_pipe, is_remote, local_path, remote_listing
from cgspn.data.shards import FEATURE_STORE, split_shards
from cgspn.pipeline.inputs import SHARDS, TEACHERS, Splits, check_splits
from cgspn.pipeline.errors import InputError, ParamError
from cgspn.pipeline.outputs import replace_dir, write_json, write_timings
from cgspn.pipeline.params import Param
from cgspn.distill.phis import PhiS, phis_file
from cgspn.pipeline.cli import run_stage
from cgspn.teachers.registry import family_of, known_teachers, teacher_side

SCHEMA = {
    "resolution": Param(int, min=14),  # images are resized and center-cropped to this square
    "splits": Param(list, item=str, auto=True),  # auto: every split at the training resolution (not photos)
    "layers": Param(dict),  # {teacher: [block, ...]}: intermediate blocks whose outputs to cache too (ViTs)
    "teacher_scale": Param(dict),  # {teacher: s}: that teacher sees the images at s x resolution (others: 1)
    "phis_splits": Param(list, item=str, auto=True),  # auto: the training splits
    "workers": Param(int, min=0),  # 0: one per GPU (gpus_per_worker > 0), else one per cpus_per_worker CPUs
    "cpus_per_worker": Param(int, min=1),
    "gpus_per_worker": Param(float, min=0.0),
    "batch_size": Param(int, min=1),
    # null: feature shards in data/features/<teacher>/; a URI prefix (s3://bucket/prefix): there instead,
    # under <teacher>/<run id>/ (a new folder per run: nothing earlier is overwritten), with
    # data/features/<teacher>/shards.json pointing to it beside meta.json and the PHI-S statistics
    "store": Param(str, optional=True),
}
OUT = Path("data/features")
ACTOR_RESTARTS = 3  # per actor: a node lost (or an actor killed) this many times over, the stage fails
METRICS = Path("reports/metrics/cache_teacher.json")


@ray.remote
class TeacherWorker:
    """Loads one teacher once; caches one shard per call."""

    def __init__(self, teacher_path: str, threads: int):
        import torch

        from cgspn.teachers.registry import load_teacher_file

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = load_teacher_file(teacher_path).eval().requires_grad_(False).to(device)
        self.name = (ray.get_runtime_context().get_node_id(), os.getpid())  # (Ray node, process)

    def cache(self, image_shard, out_shard: str, resolution: int, layers: list[int], batch_size: int):
        """One shard (a ShardRef) at the teacher's own side `resolution`, to a local path or a URL."""
        import tempfile

        from cgspn.data.feature_cache import cache_shard
        from cgspn.data.locations import is_remote, upload

        if not is_remote(out_shard):
            return self.name, cache_shard(self.teacher, image_shard, Path(out_shard), resolution, layers, batch_size)
        with tempfile.TemporaryDirectory(prefix="cgspn-features-") as tmp:
            local = Path(tmp) / Path(out_shard).name
            result = cache_shard(self.teacher, image_shard, local, resolution, layers, batch_size)
            upload(local, out_shard)
        return self.name, result


def pool_size(p: dict) -> int:
    if p["workers"]:
        return p["workers"]
    res = ray.cluster_resources()
    if p["gpus_per_worker"] > 0:
        return max(1, int(res.get("GPU", 0) / p["gpus_per_worker"]))
    return max(1, int(res.get("CPU", 1) // p["cpus_per_worker"]))


def per_teacher(p: dict, key: str, teachers: list[dict], check) -> dict:
    """`cache_teacher.<key>` ({teacher: value}) for the materialized teachers, each value checked by
    `check(where, value, entry)` (which raises ParamError). A registered teacher that teacher.names does not
    list is ignored (params.yaml may hold settings for a teacher the run does not use); any other name is
    refused (a typo)."""
    entry = {t["name"]: t for t in teachers}
    unknown = sorted(set(p[key]) - set(entry) - set(known_teachers()))
    if unknown:
        raise ParamError(f"cache_teacher.{key} names {unknown}, which are neither materialized teachers "
                         f"{sorted(entry)} (teacher.names) nor registered ones")
    for name, value in p[key].items():
        if name in entry:
            check(f"cache_teacher.{key}.{name}", value, entry[name])
    return {name: value for name, value in p[key].items() if name in entry}


def check_layers(where: str, blocks, teacher: dict) -> None:
    if not isinstance(blocks, list) or any(isinstance(k, bool) or not isinstance(k, int) for k in blocks):
        raise ParamError(f"{where} must be a list of block indices, got {blocks!r}")
    depth = teacher["config"]["depth"]
    bad = [k for k in blocks if not 0 <= k < depth]
    if bad:
        kind = "" if depth else f", a {teacher['config'].get('family')} teacher: it has no block outputs"
        raise ParamError(f"{where}: blocks {bad} out of range for {teacher['name']} ({depth} blocks{kind})")


def check_scale(where: str, scale, teacher: dict) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ParamError(f"{where} must be a finite number > 0, got {scale!r}")


def check_inputs(p: dict, root: Path) -> tuple[list[dict], list[tuple[str, Path]]]:
    """The teachers (teachers.json entries, each with its "side" and "layers" for this run) and the jobs."""
    splits = Splits(root)
    p["splits"] = splits.resolve(p["splits"], splits.base, "cache_teacher.splits")
    p["phis_splits"] = splits.resolve(p["phis_splits"], splits.train, "cache_teacher.phis_splits")
    missing = sorted(set(p["phis_splits"]) - set(p["splits"]))
    if missing:
        raise ParamError(f"cache_teacher.phis_splits {missing} are not in cache_teacher.splits")
    index = root / TEACHERS / "teachers.json"
    if not index.exists():
        raise InputError(f"{index}: missing (run the teacher stage first)")
    teachers = json.loads(index.read_text())["teachers"]
    layers = per_teacher(p, "layers", teachers, check_layers)
    scales = per_teacher(p, "teacher_scale", teachers, check_scale)
    for t in teachers:
        t["scale"], t["layers"] = scales.get(t["name"], 1), layers.get(t["name"], [])
        t["side"] = teacher_side(p["resolution"], t["scale"])
        patch = t["config"]["patch_size"]
        # a ViT cuts its input into patches; a CNN pads ("SAME") and takes any side
        if family_of(t["config"]).patches and t["side"] % patch:
            at = f" (at teacher_scale {t['scale']}: {t['side']} px)" if t["scale"] != 1 else ""
            raise ParamError(f"cache_teacher.resolution={p['resolution']}{at} is not a multiple of "
                             f"teacher {t['name']}'s patch size {patch}")
    check_splits(root / SHARDS, p["splits"], "cache_teacher.splits")  # indexes, complete shards: before Ray
    jobs = [(split, shard) for split in p["splits"] for shard in split_shards(root / SHARDS, split)]
    return teachers, jobs


def cache_teacher(teacher: dict, jobs, p: dict, root: Path, out_dir: Path) -> tuple[dict, dict]:
    """One teacher over every shard; returns its metrics and its timings."""
    out_dir.mkdir()
    shards_at = str(out_dir)
    if p["store"]:  # a new folder per run under the prefix: an earlier run's features stay where they are
        shards_at = f"{p['store'].rstrip('/')}/{teacher['name']}/{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    n = pool_size(p)
    path = str((root / TEACHERS / teacher["file"]).resolve())
    t0 = time.perf_counter()
    per_actor = {"CPU": p["cpus_per_worker"], **({"GPU": p["gpus_per_worker"]} if p["gpus_per_worker"] else {})}
    check_resources(per_actor, n, f"cache_teacher's {n} workers")
    # An actor whose node dies starts again elsewhere and retries the shard it had (ACTOR_RESTARTS times);
    # the shards already written stay. Spread over the nodes: a lost node takes the fewest shards with it.
    actors = [TeacherWorker.options(num_cpus=p["cpus_per_worker"], num_gpus=p["gpus_per_worker"],
                                    max_restarts=ACTOR_RESTARTS,
                                    scheduling_strategy="SPREAD").remote(path, p["cpus_per_worker"])
              for _ in range(n)]
    try:
        ray.get([a.__ray_ready__.remote() for a in actors])
    except ray.exceptions.RayActorError:  # lost as it started: it starts again, run_jobs waits for it
        pass
    t1 = time.perf_counter()
    split_of = {shard.name: split for split, shard in jobs}
    tasks = [(shard, f"{shards_at}/{shard.name}") for _, shard in jobs]
    per_worker, per_split, moments = defaultdict(lambda: [0, 0.0]), dict.fromkeys(p["splits"], 0), None
    total, redone = 0, []
    try:
        # (worker, result) per shard, summed in job order, not in the order the workers finish: the same input
        # gives the same bits
        def lost(index: int, error: Exception) -> None:
            redone.append(tasks[index][0].name)
            tqdm.write(f"cache_teacher: a worker was lost with shard {tasks[index][0].name} ({type(error).__name__}); "
                       "the shard runs again", file=sys.stderr)

        results = in_order(run_jobs(actors, tasks, lambda a, job: a.cache.remote(
            job[0], job[1], teacher["side"], teacher["layers"], p["batch_size"]), ACTOR_RESTARTS, lost))
        with tqdm(total=len(tasks), desc=f"cache {teacher['name']}", unit="shard") as bar:
            for worker, r in results:
                per_worker[worker][0] += r.count
                per_worker[worker][1] += r.seconds
                per_split[split_of[r.shard]] += r.count
                total += r.count
                if split_of[r.shard] in p["phis_splits"]:
                    moments = r.moments if moments is None else {k: moments[k] + r.moments[k] for k in moments}
                bar.update(1)
                bar.set_postfix(images=total)
    finally:  # on an error too: no actor may go on writing into the staging folder once it is removed
        for a in actors:
            ray.kill(a)
    seconds = time.perf_counter() - t1
    if moments is None:
        raise InputError(f"cache_teacher: no features in phis_splits {p['phis_splits']} to estimate PHI-S from")
    phis = {kind: PhiS.estimate(m) for kind, m in moments.items()}
    for kind, stats in phis.items():
        stats.save(out_dir / phis_file(kind))
    if p["store"]:
        listed = remote_listing(shards_at)
        write_json(out_dir / FEATURE_STORE, {"store": shards_at, "shards": listed})
        feature_bytes = sum(f["size"] for f in listed.values())
    else:
        feature_bytes = sum(f.stat().st_size for f in out_dir.glob("*.tar"))
    grid = math.ceil(teacher["side"] / teacher["config"]["patch_size"])  # a ViT's side is a multiple
    meta = {"teacher": teacher["name"], "resolution": p["resolution"], "teacher_resolution": teacher["side"],
            "scale": teacher["scale"], "grid": [grid, grid], "dim": teacher["config"]["dim"],
            "layers": teacher["layers"], "dtype": "float16",
            "splits": per_split, "phis_splits": p["phis_splits"], "phis_vectors": moments["spatial"].count,
            "phis_scale": phis["spatial"].scale, "phis_summary_scale": phis["summary"].scale}
    write_json(out_dir / "meta.json", meta)
    rates = [c / s for c, s in per_worker.values() if s > 0]
    # tracked: what the same input always gives; the run's own circumstances go with the timings
    metrics = {"images": total, "workers": n, "bytes": feature_bytes,
               "bytes_per_image": round(feature_bytes / max(total, 1))}
    timings = {"nodes": len({node for node, _ in per_worker}), "startup_seconds": round(t1 - t0, 2),
               "seconds": round(seconds, 2), "images_per_s": round(total / seconds, 1), "images_per_s_per_worker": round(sum(rates) / len(rates), 1),
               "shards_redone": len(redone)}
    return metrics, timings


def main(p: dict, root: Path, run) -> dict:
    """Cache the teachers' features."""
    root = root.resolve()  # the actors' paths: on a cluster their working directory is not the driver's
    teachers, jobs = check_inputs(p, root)
    metrics, timings = {}, {}
    with replace_dir(root / OUT) as staging:
        # what the actors read and write on local paths: folders every node of a cluster must see
        local = [root / TEACHERS, *{local_path(shard.url).parent for _, shard in jobs
                                     if not (is_remote(shard.url) or is_pipe(shard.url))}]
        started = start_ray(p["workers"] * p["cpus_per_worker"], "cache_teacher",
                            shared=local if p["store"] else [staging, *local])
        try:  # Ray stops before replace_dir removes a failed run's staging folder
            for t in teachers:
                m, tm = cache_teacher(t, jobs, p, root, staging / Path(t["file"]).stem)
                metrics[t["name"]], timings[t["name"]] = m, tm
                print(f"cache_teacher: {t['name']}: {m['images']} images at {t['side']} px, {tm['images_per_s']} img/s with "
                      f"{m['workers']} workers on {tm['nodes']} node(s) ({tm['images_per_s_per_worker']} img/s "
                      f"per worker), {m['bytes_per_image']} B/image")
        finally:
            if started:
                ray.shutdown()
    write_json(root / METRICS, metrics)
    write_timings(root, "cache_teacher", timings)
    run.log_metrics({t: {**metrics[t], **timings[t]} for t in metrics})
    return metrics


if __name__ == "__main__":
    run_stage("cache_teacher", SCHEMA, main)
