"""The flow's part of issue 29: the stages and the parent-run variable named in one place (cgspn.pipeline.names)."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def with_flows(dest: Path) -> Path:
    """A micro git + DVC repository at `dest` that also holds the flows, so that `python -m flows.pipeline`
    run there treats it as its repository, as it treats this one."""
    from micro import make_repo

    make_repo(dest)
    shutil.copytree(REPO / "flows", dest / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def string_lists(path: Path):
    """(line, values) of every list or tuple literal made only of strings in the file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield node.lineno, [e.value for e in node.elts]


def test_the_flow_and_the_pipeline_package_name_no_stage_and_no_parent_run_variable_of_their_own():
    from cgspn.pipeline.names import PARENT_RUN_ENV, STAGES

    files = [p for folder in ("flows", "cgspn/pipeline") for p in sorted((REPO / folder).glob("*.py"))
             if p.name != "names.py"]
    found = []
    for path in files:
        rel = path.relative_to(REPO)
        found += [f"{rel}:{line} {values}" for line, values in string_lists(path)
                  if len(values) > 1 and set(values) <= set(STAGES)]
        found += [f"{rel}:{node.lineno} {node.value!r}" for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Constant) and node.value == PARENT_RUN_ENV]
    assert not found, found
