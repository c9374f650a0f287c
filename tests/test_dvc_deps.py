"""dvc.yaml's code dependencies are each stage's import closure: a change to any file a stage runs reruns
that stage, and no stage depends on code it does not run. Stages share code through the library only."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from cgspn.pipeline.code_closure import (code_digest, dvc_deps, expected_deps, is_code_dep, module_closure, stage_modules)

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = REPO / "dvc.yaml"


def stage_deps() -> dict[str, list[str]]:
    return {name: [str(d) for d in stage.get("deps", [])]
            for name, stage in yaml.safe_load(DVC_YAML.read_text())["stages"].items()}


def test_every_stage_depends_on_exactly_the_code_it_runs():
    expected, listed = expected_deps(DVC_YAML), stage_deps()
    assert set(expected) == set(listed)  # every stage is a `python -m` module
    for stage, deps in expected.items():
        code = [d for d in listed[stage] if is_code_dep(d)]
        assert code == deps, (f"dvc.yaml: {stage}'s code deps drifted from its imports; run "
                              f"`python -m cgspn.pipeline.code_closure --write`. Missing {sorted(set(deps) - set(code))}, "
                              f"not imported {sorted(set(code) - set(deps))}")


def test_every_dependency_exists_or_is_an_output_of_an_earlier_stage():
    stages = yaml.safe_load(DVC_YAML.read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    produced: set[str] = set()
    for name, stage in stages.items():
        for dep in map(str, stage.get("deps", [])):
            # ${section.key}: DVC fills it in from params.yaml (shard's data)
            dep = re.sub(r"\$\{(\w+)\.(\w+)\}", lambda m: str(params[m.group(1)][m.group(2)]), dep)
            assert (REPO / dep).exists() or dep in produced, f"dvc.yaml: {name} depends on {dep}, which is neither " \
                                                              f"in the repository nor written by an earlier stage"
        for kind in ("outs", "metrics", "plots"):
            produced.update(next(iter(o)) if isinstance(o, dict) else o for o in stage.get(kind, []))


def test_no_stage_imports_another_stage():
    for stage, module in stage_modules(DVC_YAML).items():
        own = {f"stages/{module.split('.')[-1]}.py", "stages/__init__.py"}
        others = sorted(f for f in module_closure(module) if f.startswith("stages/") and f not in own)
        assert not others, f"{module} imports {others}: move what they share into cgspn/"


def write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def test_the_closure_follows_every_kind_of_import(tmp_path):
    """Absolute, relative and function-level imports, `from package import module`, package __init__
    files on the way; modules outside the root (torch) and unused files are left out."""
    write(tmp_path, "app/__init__.py", "")
    write(tmp_path, "app/main.py", "import torch\nfrom lib.a import f\n\ndef g():\n    from lib import lazy\n")
    write(tmp_path, "lib/__init__.py", "")
    write(tmp_path, "lib/a.py", "from .sub import b\nfrom . import c as _c\n")
    write(tmp_path, "lib/sub/__init__.py", "from ..d import x\n")
    write(tmp_path, "lib/sub/b.py", "")
    write(tmp_path, "lib/c.py", "")
    write(tmp_path, "lib/d.py", "")
    write(tmp_path, "lib/lazy.py", "")
    write(tmp_path, "lib/unused.py", "")
    assert module_closure("app.main", tmp_path) == {
        "app/__init__.py", "app/main.py", "lib/__init__.py", "lib/a.py", "lib/c.py", "lib/d.py", "lib/lazy.py",
        "lib/sub/__init__.py", "lib/sub/b.py"}
    # a folder whose every .py file is used is listed as the folder
    assert dvc_deps(module_closure("app.main", tmp_path), tmp_path) == [
        "app", "lib/__init__.py", "lib/a.py", "lib/c.py", "lib/d.py", "lib/lazy.py", "lib/sub"]
    with pytest.raises(ModuleNotFoundError, match="app.nope"):
        module_closure("app.nope", tmp_path)


def test_the_code_digest_changes_with_the_code_a_stage_runs_and_nothing_else(tmp_path):
    for sub in ("stages", "cgspn", "kernels"):
        shutil.copytree(REPO / sub, tmp_path / sub, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest("stages.distill_stage1", tmp_path)
    (tmp_path / "cgspn/report/build.py").write_text("# not run by distill_stage1\n")
    assert code_digest("stages.distill_stage1", tmp_path) == before
    losses = tmp_path / "cgspn/distill/losses.py"
    losses.write_text(losses.read_text() + "\n# a change\n")
    assert code_digest("stages.distill_stage1", tmp_path) != before
