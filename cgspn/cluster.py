"""Ray connection shared by the stages that use it: join RAY_ADDRESS when set, else start Ray locally."""
from __future__ import annotations

import os


def start_ray(local_cpus: int) -> bool:
    """Connect to the cluster at RAY_ADDRESS, or start a local Ray with at least `local_cpus` CPUs.

    Returns True when this call started Ray (the caller then shuts it down), False when it was running.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, local_cpus), log_to_driver=True)
    return True
