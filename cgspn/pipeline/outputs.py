"""Outputs that are never half-written: a file or a whole directory appears complete or not at all.

    with replace_dir("data/shards") as staging:   # write everything into `staging`
        ...
    # on success `data/shards` is swapped for the new tree; on error the old one is untouched
    write_json("reports/metrics/shard.json", metrics)
    write_timings(".", "shard", {"seconds": 12.3})          # reports/timings/shard.json, untracked
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, data) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


TIMINGS = Path("reports/timings")  # untracked (.gitignore) and no DVC output: a rerun's times change nothing tracked


def write_timings(root: Path, stage: str, timings: dict) -> Path:
    """A stage's wall times and rates (they differ run to run on the same results) apart from its science
    metrics: reports/timings/<stage>.json. The report reads them when it runs; MLflow has them too."""
    return write_json(Path(root) / TIMINGS / f"{stage}.json", timings)


def read_timings(root: Path, stage: str) -> dict:
    path = Path(root) / TIMINGS / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def remove_tree(path: Path, attempts: int = 10) -> None:
    """rmtree that retries while something still ends a write inside (a worker being stopped)."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.5)


@contextlib.contextmanager
def replace_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `final`; on success it replaces `final` as a whole.

    The old `final` is moved aside before the swap and deleted only after the new tree is in place,
    so no moment exists where a partial tree sits at `final`. On an exception the staging tree is
    removed and `final` is left exactly as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial{os.getpid()}")
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        remove_tree(staging)
        raise
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
