"""Put back the outputs of a stage that failed under `dvc repro`, as dvc.lock records them.

    python -m cgspn.pipeline.restore distill_stage2 [more stages]   # in the DVC repository

DVC deletes a stage's outputs before it runs the stage's command (they are not `persist`, so that DVC's
run-cache works, dvc.yaml). dvc.lock changes only when the stage succeeds, so after a failure it still names
the earlier outputs: the cached ones (data, models, the stage's metrics) come back with `dvc checkout`; the
uncached ones (the loss curves and figures git tracks) from DVC's cache, where the run-cache keeps a copy of
every run's, or else from git's HEAD when that holds the same bytes. The Prefect flow calls `restore` itself
after a stage fails; the stage's own error line names this command for a plain `dvc repro`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml


def dvc_executable() -> str:
    return str(Path(sys.executable).with_name("dvc"))


def locked_outputs(root: Path, stage: str) -> list[dict]:
    """dvc.lock's outs of `stage` ([{path, md5, ...}]); [] where dvc.lock has no entry for it."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return []
    return (yaml.safe_load(lock.read_text()).get("stages", {}).get(stage) or {}).get("outs", [])


def dvc_outputs(root: Path, stage: str) -> dict[str, dict]:
    """dvc.yaml's outputs of `stage` (outs, metrics and plots) -> {path: its options ({} for none)}."""
    spec = (yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}).get("stages", {}).get(stage) or {}
    outputs = {}
    for entry in (e for kind in ("outs", "metrics", "plots") for e in spec.get(kind, [])):
        (path, options), = entry.items() if isinstance(entry, dict) else [(entry, {})]
        outputs[path] = options or {}
    return outputs


def uncached_paths(root: Path, stage: str) -> set[str]:
    """The outputs of `stage` that dvc.yaml keeps out of DVC's cache (cache: false)."""
    return {path for path, options in dvc_outputs(root, stage).items() if options.get("cache") is False}


def removes_outputs(root: Path, stage: str) -> bool:
    """Whether `dvc repro` deletes some output of `stage` before running it (one that is not `persist`)."""
    return any(not options.get("persist") for options in dvc_outputs(root, stage).values())


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def cache_folder(root: Path) -> Path:
    """Where DVC's cache keeps files by MD5 (.dvc/cache/files/md5 unless `dvc cache dir` moved it)."""
    done = subprocess.run([dvc_executable(), "cache", "dir"], cwd=root, capture_output=True, text=True)
    return Path(done.stdout.strip() if done.returncode == 0 else Path(root) / ".dvc/cache") / "files/md5"


def from_cache(cache: Path, md5: str) -> bytes | None:
    """The bytes DVC's cache holds under `md5` (<cache>/ab/cdef...), or None."""
    path = cache / md5[:2] / md5[2:]
    return path.read_bytes() if path.is_file() else None


def from_git(root: Path, path: str, md5: str) -> bytes | None:
    """git's HEAD copy of `path` when it has the md5 dvc.lock records, else None."""
    done = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True)
    return done.stdout if done.returncode == 0 and md5_of(done.stdout) == md5 else None


def restore_uncached(root: Path, cache: Path, out: dict) -> str | None:
    """Write one uncached output back (a file, or a folder DVC recorded as a .dir listing); None when done,
    else why it could not be."""
    path, md5 = out["path"], out.get("md5", "")
    if md5.endswith(".dir"):
        listing = from_cache(cache, md5)
        if listing is None:
            return f"{path}: DVC's cache has no copy"
        files = [(f"{path}/{e['relpath']}", e["md5"]) for e in json.loads(listing)]
    else:
        files = [(path, md5)]
    blobs = {}
    for file, digest in files:
        target = Path(root) / file
        if target.is_file() and md5_of(target.read_bytes()) == digest:
            continue
        data = from_cache(cache, digest)
        data = data if data is not None else from_git(root, file, digest)
        if data is None:
            return f"{file}: neither DVC's cache nor git's HEAD has the copy dvc.lock names"
        blobs[target] = data
    for target, data in blobs.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return None


def restore(root: Path, stage: str) -> tuple[list[str], list[str]]:
    """The outputs of `stage` as dvc.lock records them -> (restored paths, problems: one line each)."""
    root = Path(root)
    outs = locked_outputs(root, stage)
    if not outs:
        return [], [f"dvc.lock has no outputs of stage {stage} (it never succeeded here): nothing to restore"]
    uncached = uncached_paths(root, stage)
    cache = cache_folder(root)
    problems, failed = [], set()
    for out in outs:
        if out["path"] in uncached and (problem := restore_uncached(root, cache, out)):
            problems.append(problem)
            failed.add(out["path"])
    cached = [out["path"] for out in outs if out["path"] not in uncached]
    if cached:
        done = subprocess.run([dvc_executable(), "checkout", "--force", stage], cwd=root, capture_output=True,
                              text=True)
        if done.returncode != 0:
            problems.append(f"dvc checkout {stage}: " + " ".join((done.stderr or done.stdout).split())[-500:])
            failed.update(cached)
    return [out["path"] for out in outs if out["path"] not in failed], problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="+", help="the stages whose outputs to put back")
    parser.add_argument("--root", default=".", help="the DVC repository (default: .)")
    args = parser.parse_args(argv)
    status = 0
    for stage in args.stages:
        restored, problems = restore(Path(args.root), stage)
        print(f"{stage}: restored {', '.join(restored) or 'nothing'}")
        for line in problems:
            print(f"{stage}: error: {line}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
