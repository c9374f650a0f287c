"""params-full.yaml at micro size: its settings, with every number that sets a size or a rate (counts,
steps, resolutions, batch sizes, workers, rates) and the paths taken from tests/micro.py, through the
teacher, cache_teacher and the three training stages. What the `full` set chooses beyond sizes (two
teachers, two cached blocks and their targets, teacher scales, the weights of the objective, one actor
per CPU) is what this run exercises; the sizes themselves need the GPU cluster the set is written for.

The training stages run twice, each on its own copy of the same input, and write the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from micro import MICRO, TRAIN_STAGES, copy_root, copy_tree, digest, run

REPO = Path(__file__).resolve().parents[1]
KEEP = {("cache_teacher", "workers")}  # 0 = one actor per cpus_per_worker CPUs: the full set's choice, kept


def is_size(value) -> bool:
    numbers = value if isinstance(value, list) else [value]
    return bool(numbers) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)


def micro_sized(full: dict) -> dict:
    """`full` with MICRO's value wherever full's is a number (or a list of numbers) or a path."""
    out = json.loads(json.dumps(full))
    for section, values in MICRO.items():
        for key, micro_value in values.items():
            if (section, key) in KEEP or key not in out.get(section, {}):
                continue
            if is_size(out[section][key]) or key in ("path", "storage_path"):
                out[section][key] = micro_value
    return out


def significant(value: float, digits: int = 4) -> bool:
    """Whether `value` is written with at most `digits` significant digits."""
    return float(f"{value:.{digits}g}") == value


def figures(tree) -> list[float]:
    """Every float in a JSON tree."""
    if isinstance(tree, dict):
        return [v for x in tree.values() for v in figures(x)]
    if isinstance(tree, list):
        return [v for x in tree for v in figures(x)]
    return [tree] if isinstance(tree, float) else []


def test_the_full_parameter_set_runs_at_micro_size_and_twice_writes_the_same_bytes(micro, tmp_path):
    """distill_stage1 (two workers: the gradients are all-reduced), distill_stage2 (validating every 2 steps)
    and highres (its PHI-S statistics estimated online) run twice, each root going on from its own, identical,
    outputs: the student, its config, the metrics, the curves and the plot are byte-identical, and the tracked
    figures carry 4 significant digits, so that another machine's last bits do not show in them."""
    full = yaml.safe_load((REPO / "params-full.yaml").read_text())
    params = micro_sized(full)
    params["distill_stage2"]["val_every"] = 2
    assert params["distill_stage1"]["gpus_per_worker"] == 0 and params["distill_stage1"]["workers"] == 2
    assert params["cache_teacher"]["layers"] == full["cache_teacher"]["layers"] != MICRO["cache_teacher"]["layers"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))

    first = copy_root(micro["root"], tmp_path / "root0", parts=("data/shards",))
    data = {stage: run(stage, path, first) for stage in ("teacher", "cache_teacher")}
    teachers = [t["name"] for t in json.loads((first / "models/teachers/teachers.json").read_text())["teachers"]]
    assert teachers == full["teacher"]["names"]
    for name, blocks in full["cache_teacher"]["layers"].items():
        assert json.loads((first / "data/features" / name / "meta.json").read_text())["layers"] == blocks
    assert data["cache_teacher"][teachers[0]]["workers"] >= 1
    second = copy_tree(first, tmp_path / "root1", skip=("mlruns",))

    for stage in TRAIN_STAGES:
        for root in (first, second):
            metrics = run(stage, path, root)
            assert metrics["steps"] == params[stage]["steps"], metrics
        outputs = [f"models/{stage}", f"reports/metrics/{stage}.json", f"reports/plots/{stage}.csv",
                   f"reports/plots/{stage}.png"]
        a, b = ({o: digest(root / o) if (root / o).is_dir() else (root / o).read_bytes() for o in outputs}
                for root in (first, second))
        assert a == b, [o for o in outputs if a[o] != b[o]]
        metrics = json.loads((first / "reports/metrics" / f"{stage}.json").read_text())
        curves = (first / "reports/plots" / f"{stage}.csv").read_text().splitlines()
        cells = [float(c) for row in curves[1:] for c in row.split(",") if c]
        assert figures(metrics) and all(map(significant, figures(metrics) + cells)), stage
        assert (first / "models" / stage / "student.safetensors").is_file(), stage
