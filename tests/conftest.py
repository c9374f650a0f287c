"""Test-wide settings: CPU Triton runs in its interpreter; quiet, offline embedded services."""
import os

# Must be set before anything imports triton (the kernels pick the interpreter at definition time).
os.environ.setdefault("TRITON_INTERPRET", "1")
for key, value in {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
