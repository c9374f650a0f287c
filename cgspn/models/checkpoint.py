"""Model weights as safetensors plus a JSON config beside them; never pickle. Writes are atomic."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cgspn.pipeline.outputs import atomic_write, write_json


def config_path(path: str | Path) -> Path:
    """`models/x.safetensors` -> `models/x.json`."""
    return Path(path).with_suffix(".json")


def save_model(model: nn.Module, path: str | Path, config: dict) -> Path:
    """Write the state dict to `path` (.safetensors) and `config` to the JSON beside it, each atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a checkpoint path must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    write_json(config_path(path), config)
    return path


def read_config(path: str | Path) -> dict:
    cfg = config_path(path)
    if not cfg.exists():
        raise FileNotFoundError(f"{path}: its config {cfg.name} is missing beside it")
    return json.loads(cfg.read_text())


def load_state(model: nn.Module, path: str | Path) -> nn.Module:
    """Load `path` into `model`, refusing missing or unexpected keys and wrong shapes, naming file and key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path.name}: not a readable safetensors file ({err})") from err
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{path.name}: key {missing[0]} is missing ({len(missing)} missing in all)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(f"{path.name}: unexpected key {unexpected[0]} ({len(unexpected)} unexpected in all)")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"{path.name}: key {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
            )
    with torch.no_grad():
        model.load_state_dict(state)
    return model
