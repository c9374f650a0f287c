"""The repository code a module runs: its in-repo import closure, read from the source (no import).

    files = module_closure("stages.distill_stage2")   # {"stages/distill_stage2.py", "cgspn/distill/tasks.py", ...}
    dvc_deps(files)                                   # the same, whole folders where all of one is used
    code_digest("stages.distill_stage2")              # sha256 over those files' paths and contents

Every `import` and `from ... import` anywhere in a file counts (also inside functions: Ray workers and
lazy imports run that code too), and so does the `__init__.py` of every package on the way. `dvc.yaml`
lists each stage's closure as its code dependencies (tests/test_dvc_deps.py derives and compares them;
`python -m cgspn.pipeline.code_closure` prints them, `--write` puts them into dvc.yaml), and the training stages
key their Ray runs by its digest, so a code change reruns and retrains exactly the stages it can affect.
"""
from __future__ import annotations

import ast
import hashlib
import sys
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """`a.b` -> `a/b.py` or `a/b/__init__.py` relative to root, if it exists there."""
    base = Path(*module.split("."))
    for rel in (base.with_suffix(".py"), base / "__init__.py"):
        if (root / rel).is_file():
            return rel
    return None


@lru_cache(maxsize=None)
def _imports(path: Path, module: str, source: str) -> tuple[str, ...]:
    """Absolute names of every module (and `from m import name` candidate `m.name`) the source imports."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            names += [f"{base}.{a.name}" for a in node.names if a.name != "*"]
    return tuple(names)


def module_closure(module: str, root: Path = REPO_ROOT) -> set[str]:
    """Repository-relative paths (posix) of the files `module` runs: itself, its packages' `__init__.py`,
    and, transitively, every in-repo module it imports."""
    root = Path(root)
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # the module and every package above it (importing a.b.c runs a/__init__.py and a/b/__init__.py)
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            rel = module_file(sub, root)
            if rel is None or rel.as_posix() in seen:
                continue
            seen.add(rel.as_posix())
            todo.extend(_imports(rel, sub, (root / rel).read_text()))
    if module_file(module, root) is None:
        raise ModuleNotFoundError(f"{module}: no such module under {root}")
    return seen


def dvc_deps(files: set[str], root: Path = REPO_ROOT) -> list[str]:
    """The closure as dvc.yaml lists it: a folder where every .py file under it is in `files`, else the files."""
    root = Path(root)
    out: list[str] = []

    def covered(folder: Path) -> bool:
        return all(p.relative_to(root).as_posix() in files for p in folder.rglob("*.py"))

    def visit(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            rel = entry.relative_to(root).as_posix()
            if entry.is_dir() and entry.name != "__pycache__" and any(f.startswith(rel + "/") for f in files):
                if covered(entry):
                    out.append(rel)
                else:
                    visit(entry)
            elif entry.is_file() and rel in files:
                out.append(rel)

    visit(root)
    return out


def code_digest(module: str, root: Path = REPO_ROOT) -> str:
    """sha256 over the closure's paths and contents: changes exactly when code `module` runs changes."""
    root = Path(root)
    digest = hashlib.sha256()
    for rel in sorted(module_closure(module, root)):
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return digest.hexdigest()


CODE_DIRS = ("cgspn", "kernels", "stages", "flows")  # the repository's Python packages


def is_code_dep(dep: str) -> bool:
    """A dvc.yaml dependency on the repository's code (as opposed to data, models or reports)."""
    return dep.endswith(".py") or dep.split("/", 1)[0] in CODE_DIRS


def stage_modules(dvc_yaml: Path) -> dict[str, str]:
    """{stage: module} for every dvc.yaml stage whose command is `python -m <module>`."""
    import yaml

    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        words = str(stage.get("cmd", "")).split()
        if "-m" in words:
            out[name] = words[words.index("-m") + 1]
    return out


def expected_deps(dvc_yaml: Path, root: Path = REPO_ROOT) -> dict[str, list[str]]:
    """{stage: its code dependencies as dvc.yaml should list them}."""
    return {stage: dvc_deps(module_closure(module, root), root) for stage, module in stage_modules(dvc_yaml).items()}


def write_deps(dvc_yaml: Path, root: Path = REPO_ROOT) -> list[str]:
    """Rewrite every stage's code dependencies in dvc.yaml (its other deps, comments and order kept);
    returns the stages whose list changed."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = yaml.load(Path(dvc_yaml).read_text())
    changed = []
    for stage, deps in expected_deps(dvc_yaml, root).items():
        current = doc["stages"][stage].get("deps", [])
        if [d for d in current if is_code_dep(str(d))] != deps:
            doc["stages"][stage]["deps"] = deps + [d for d in current if not is_code_dep(str(d))]
            changed.append(stage)
    if changed:
        with open(dvc_yaml, "w") as f:
            yaml.dump(doc, f)
    return changed


def main(argv: list[str] | None = None) -> None:
    """Print every stage's code dependencies as dvc.yaml should list them; --write puts them there."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--write", action="store_true", help="update dvc.yaml in place")
    args = parser.parse_args(argv)
    dvc_yaml = REPO_ROOT / "dvc.yaml"
    if args.write:
        changed = write_deps(dvc_yaml)
        print(f"dvc.yaml: code dependencies updated for {', '.join(changed)}" if changed else "dvc.yaml: up to date")
        return
    for stage, deps in expected_deps(dvc_yaml).items():
        print(f"{stage}:")
        for dep in deps:
            print(f"  - {dep}")


if __name__ == "__main__":
    sys.exit(main())
