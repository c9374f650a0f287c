"""Which lines of a stage's output the flow logs at DEBUG (advice, known-benign noise) and which at INFO:
Ray Train's transient-overload warning and its traceback go to DEBUG, any other traceback stays INFO.
The lines are what a CPU-starved run of distill_stage1 printed (2026-12-01), frames shortened."""
from __future__ import annotations

import logging

from flows.log_levels import OutputLevels

C = "\x1b[36m(TrainController pid=19103)\x1b[0m "
W = "\x1b[36m(RayTrainWorker pid=19296)\x1b[0m "
WARNING = (C + "Failed to send resource request for train-0ab2ad12e4d94c3181468f880a8cb6dd. If this only happens "
           "transiently during network partition or CPU being overloaded, it's safe to ignore this error.")
TRACEBACK = [C + "Traceback (most recent call last):",
             C + '  File "/x/ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", '
                 "line 58, in send_resource_request",
             C + "    ray.get(",
             C + '  File "/x/ray/_private/worker.py", line 3009, in get',
             C + "    values, debugger_breakpoint = worker.get_objects(",
             C + "                                  ^^^^^^^^^^^^^^^^^^^",
             C + '  File "python/ray/includes/common.pxi", line 107, in ray._raylet.check_status',
             C + "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready."]


def levels(lines: list[str]) -> list[int]:
    level = OutputLevels()
    return [level(line) for line in lines]


def test_rays_transient_overload_warning_and_its_traceback_are_debug_and_what_follows_is_info():
    after = [C + "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 1}] * 2",
             W + "distill_stage1: step 1/6 loss 26.0797 lr 1.00e-03 55.0 img/s"]
    found = levels([C + "Requesting resources: {'CPU': 1} * 2", WARNING, *TRACEBACK, WARNING, *TRACEBACK, *after])
    assert found == [logging.INFO] + [logging.DEBUG] * (2 * (1 + len(TRACEBACK))) + [logging.INFO] * len(after)


def test_other_tracebacks_stay_info_even_beside_a_benign_one():
    other = [W + "Traceback (most recent call last):", W + '  File "/x/cgspn/train/loop.py", line 1, in loop',
             W + "ValueError: a real error"]
    # the benign warning's traceback interleaved with another process's: only the benign one is demoted
    found = levels([WARNING, TRACEBACK[0], other[0], TRACEBACK[1], other[1], other[2], *TRACEBACK[2:]])
    assert found == [logging.DEBUG, logging.DEBUG, logging.INFO, logging.DEBUG, logging.INFO, logging.INFO] + [
        logging.DEBUG] * len(TRACEBACK[2:])
    assert levels(other) == [logging.INFO] * 3  # without the warning: INFO
    assert levels(["Traceback (most recent call last):", "  File \"stage.py\", line 3", "KeyError: 'x'"]) == [
        logging.INFO] * 3  # the stage's own lines (no Ray prefix)


def test_advice_and_known_noise_are_debug():
    assert levels(["To track the changes with git, run:", "Use `dvc push` to send your updates to remote storage.",
                   C + "[2026-12-01 12:18:27,561 E 19087 19114] core_worker.cc:2465: Actor with class name: "
                       "'PreemptionWatcher' and ID 1 has constructor arguments in the object store",
                   "Running stage 'shard':"]) == [logging.DEBUG] * 3 + [logging.INFO]
