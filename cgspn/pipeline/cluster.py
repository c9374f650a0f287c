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
    runtime_env = {"worker_process_setup_hook": worker_setup_hook()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, local_cpus), log_to_driver=True, runtime_env=runtime_env)
    return True


def worker_setup_hook():
    """A function run in every worker of the job: RAY_ADDRESS = this cluster. Ray Train's helpers (its
    placement-group cleaner) look the cluster up by address; without one they search the machine and fail
    with "Found multiple active Ray instances" whenever another Ray runs there (a traceback in every stage's
    log).

    The hook is a closure so that Ray ships it by value: a module-level function would be imported in the
    worker before the driver's sys.path is in place, and `cgspn` would then resolve to the installed (editable)
    copy instead of the code the stage runs."""

    def pin_ray_address() -> None:
        import os

        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)

    return pin_ray_address
