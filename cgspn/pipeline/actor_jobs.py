"""Jobs over a pool of Ray actors that survives losing actors: a job whose actor was lost (its node went away,
the process was killed) goes back to the queue and runs again on the next free actor.

    for index, result in run_jobs(actors, jobs, lambda actor, job: actor.work.remote(job), retries=3): ...

Results arrive in the order jobs finish (index = the job's position in `jobs`). The actors are created with
`max_restarts`: a lost actor is probed (a no-op call) until it answers again, started anew on a node with room,
and then takes jobs as before; one that is gone for good (its restarts used up) leaves the pool. An error the
job itself raised (bad input) is not retried: it propagates as Ray raises it.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any, Callable, Iterator, Sequence

from cgspn.pipeline.errors import ClusterError

PROBE_EVERY_S = 1.0  # while a lost actor's node is not yet known to be dead, calls to it fail at once


def run_jobs(actors: Sequence, jobs: Sequence, submit: Callable[[Any, Any], Any], retries: int,
             on_lost: Callable[[int, Exception], None] = lambda index, error: None) -> Iterator[tuple[int, Any]]:
    """Yield (job index, result) for every job; a job runs again when its actor is lost, up to `retries` times
    (`on_lost(job index, error)` is told each time).
    ClusterError when a job was lost more often than that, or when every actor is gone for good."""
    import ray
    from ray.exceptions import ActorDiedError, RayActorError

    idle, queue, lost, died = list(range(len(actors))), deque(range(len(jobs))), Counter(), Counter()
    pending: dict = {}  # ObjectRef -> (actor number, job index, or None for a probe)
    probes: list[tuple[float, int]] = []  # (when, actor number): lost actors to ask whether they are back
    gone: set[int] = set()
    while queue or any(index is not None for _, index in pending.values()):
        while idle and queue:
            number, index = idle.pop(0), queue.popleft()
            pending[submit(actors[number], jobs[index])] = (number, index)
        now = time.monotonic()
        for when, number in [p for p in probes if p[0] <= now]:
            probes.remove((when, number))
            pending[actors[number].__ray_ready__.remote()] = (number, None)
        if not pending:
            if len(gone) == len(actors):
                raise ClusterError(f"every Ray actor of the pool is gone for good, {len(queue)} job(s) left "
                                   f"(each lost more than {retries} times)")
            time.sleep(min(w for w, _ in probes) - now if probes else 0.1)
            continue
        done, _ = ray.wait(list(pending), num_returns=1, timeout=PROBE_EVERY_S)
        if not done:
            continue
        number, index = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except RayActorError as e:
            if index is not None:  # the job goes back first in line; the actor is asked until it answers
                lost[index] += 1
                if lost[index] > retries:
                    raise ClusterError(f"job {index} lost its Ray actor {lost[index]} times; last: "
                                       f"{' '.join(str(e).split())[:300]}") from None
                queue.appendleft(index)
                on_lost(index, e)
            elif isinstance(e, ActorDiedError):
                died[number] += 1
                if died[number] > retries:  # its restarts are used up: it will not answer again
                    gone.add(number)
                    continue
            probes.append((time.monotonic() + PROBE_EVERY_S, number))
            continue
        died[number] = 0
        idle.append(number)
        if index is not None:
            yield index, result
