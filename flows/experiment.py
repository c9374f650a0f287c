"""A pipeline run with parameter overrides as one DVC experiment that leaves the workspace as it was.

    with OverrideRun(root, ["distill_stage2.steps=300"]) as run:   # params.yaml edited for the run
        ... run the stages (dvc repro --single-item <stage>) ...
        run.save("granite-hyena")                                   # one `dvc exp save`: one experiment
    # params.yaml, dvc.lock and the metrics, plots and report are back byte for byte, the cached outputs
    # (data, models) checked out as dvc.lock says; the run's results live in the experiment
    # (`dvc exp show`, `dvc exp apply granite-hyena`).

Without overrides it does nothing: the stages run on the workspace and DVC records them in dvc.lock.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from flows.remote import dvc


class OverrideError(ValueError):
    pass


def parse_override(text: str) -> tuple[list[str], object]:
    """`section.key=value` (value in YAML) -> (["section", "key"], value)."""
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)+", key.strip()):
        raise OverrideError(f"override {text!r}: expected section.key=value")
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise OverrideError(f"override {text!r}: the value is not YAML ({e})") from None


def apply_overrides(params: Path, overrides: list[str]) -> None:
    """Set each `section.key=value` in params.yaml, keeping its comments and layout (ruamel round trip);
    a key that params.yaml does not have is an OverrideError naming it."""
    from ruamel.yaml import YAML

    ry = YAML()
    ry.preserve_quotes = True
    ry.width = 4096
    doc = ry.load(params.read_text())
    for text in overrides:
        path, value = parse_override(text)
        node = doc
        for i, part in enumerate(path[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise OverrideError(f"override {text!r}: {params.name} has no {'.'.join(path[: i + 1])}")
            node = node[part]
        if not isinstance(node, dict) or (path[-1] not in node and len(path) == 2):
            raise OverrideError(f"override {text!r}: {params.name} has no {'.'.join(path)}")
        node[path[-1]] = value
    with open(params, "w") as f:
        ry.dump(doc, f)


def uncached_outputs(root: Path) -> list[Path]:
    """The outputs dvc.yaml keeps out of DVC's cache (metrics, plots, the report, benchmarks): git's to track,
    so DVC cannot check them out again; they are restored from a copy."""
    from cgspn.pipeline.restore import uncached_paths

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return [root / path for stage in stages for path in sorted(uncached_paths(root, stage))]


class OverrideRun:
    """A snapshot of what a run may change, the overrides applied on entry, everything restored on exit."""

    def __init__(self, root: Path, overrides: list[str]):
        self.root, self.overrides, self.saved = Path(root), list(overrides), None
        self.experiment: str | None = None

    def __enter__(self) -> "OverrideRun":
        if not self.overrides:
            return self
        files = [self.root / "params.yaml", self.root / "dvc.lock"]
        for path in uncached_outputs(self.root):
            files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        self.dirs = [p for p in uncached_outputs(self.root) if p.is_dir()]
        self.saved = {p: p.read_bytes() for p in files if p.is_file()}
        try:
            apply_overrides(self.root / "params.yaml", self.overrides)
        except BaseException:
            self.restore()
            raise
        return self

    def save(self, name: str) -> str:
        """Record the workspace (the overridden params, dvc.lock, metrics, outputs) as one DVC experiment."""
        if not self.overrides:
            return ""
        taken = set(self._dvc("exp", "list", "--name-only").split())
        self.experiment = name if name not in taken else f"{name}-{len(taken)}"
        include = [a for p in uncached_outputs(self.root) if p.exists()  # also where git does not track them yet
                   for a in ("--include-untracked", str(p.relative_to(self.root)))]
        self._dvc("exp", "save", "--name", self.experiment, "--message", "overrides: " + " ".join(self.overrides),
                  *include)
        return self.experiment

    def restore(self) -> None:
        """params.yaml, dvc.lock and the uncached outputs byte for byte as they were (files the run added under
        an output folder removed), then the cached outputs checked out as the restored dvc.lock says."""
        if self.saved is None:
            return
        for folder in self.dirs:
            for p in folder.rglob("*"):
                if p.is_file() and p not in self.saved:
                    p.unlink()
        for p, data in self.saved.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        for p in (self.root / "params.yaml", self.root / "dvc.lock"):
            if p not in self.saved:
                p.unlink(missing_ok=True)
        self._dvc("checkout", "--quiet", check=False)  # outputs DVC never cached for the baseline stay as they are

    def __exit__(self, *exc) -> None:
        self.restore()

    def _dvc(self, *args: str, check: bool = True) -> str:
        done = dvc(self.root, *args)
        if check and done.returncode != 0:
            raise RuntimeError(f"dvc {' '.join(args)} failed in {self.root}: {done.stderr.strip()[-2000:]}")
        return done.stdout
