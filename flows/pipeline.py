"""The pipeline as a Prefect flow: every DVC stage in order, each a task that asks DVC to run that one
stage (`dvc repro --single-item`: DVC skips it when nothing it depends on changed, and the task then ends
in a state named "Skipped"; it checks out the outputs of a run its run-cache holds, a state named
"Restored"), streams the stage's output into the Prefect log, and retries with backoff. A stage that fails
gets its earlier outputs back (cgspn.pipeline.restore: DVC deleted them before running it). Before shard,
the data_listing task lists what is at shard.path (it always runs; not counted as a stage).

    python -m flows.pipeline                               # the whole pipeline on params.yaml
    python -m flows.pipeline -S distill_stage2.steps=300   # one run with overrides: one DVC experiment
    python -m flows.pipeline --push                        # then push outputs and run-cache (flows.remote)

A stage that rejected its input (exit status 2 and one line, cgspn.pipeline.cli) is not retried: the same
input fails the same way, and the flow ends with that line (`python -m flows.pipeline` exits 2 too).

With overrides, params.yaml is edited for the run only: the run is recorded as one DVC experiment named
after the Prefect flow run (`dvc exp show`, `dvc exp apply <name>`), and afterwards params.yaml, dvc.lock
and the metrics, plots and report are back byte for byte (flows.experiment).

MLflow: one parent run per flow run that ran something, named after the flow run, with the overrides as
parameters, the commit, the DVC experiment and the Prefect flow run as tags, the headline figures as
metrics (cgspn.report.build.headline), REPORT.md as an artifact (after a run with overrides, the one copy of
its report outside its DVC experiment) and the final student as a logged model; every stage's run is its child.
A run in which DVC skipped every stage leaves no parent run behind.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from cgspn.pipeline.quiet_env import set_defaults

REPO = Path(__file__).resolve().parents[1]
# Before Prefect is imported (its settings are read then): a run from a shell is as quiet and offline as one
# through make, and shares make's Prefect history.
set_defaults({"PREFECT_HOME": str(REPO / ".prefect")})

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402

from cgspn.pipeline.cli import BAD_INPUT  # noqa: E402
from cgspn.pipeline.names import LISTING_STAGE, PARENT_RUN_ENV, STAGES  # noqa: E402
from cgspn.pipeline.restore import dvc_executable, restore  # noqa: E402
from flows.experiment import OverrideRun, parse_override  # noqa: E402
from flows.log_levels import OutputLevels  # noqa: E402
from flows.remote import missing_lines  # noqa: E402

SKIPPED = "didn't change, skipping"  # what `dvc repro` prints for a stage that is up to date
RESTORED = "is cached - skipping run"  # what it prints for a stage whose run the run-cache holds
STAGE_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")  # how `dvc repro` reports the stage's status


class StageFailed(RuntimeError):
    """A stage that failed under `dvc repro`: its last lines of output."""


class StageInputError(StageFailed):
    """A stage that rejected its input: its one error line. The same input fails the same way: not retried."""


def stage_exit(lines: list[str]) -> int | None:
    """The stage command's own exit status, as DVC reports it (DVC itself exits 255), or None."""
    found = [int(m.group(1)) for line in lines if (m := STAGE_EXIT.search(line))]
    return found[-1] if found else None


def stage_error(stage: str, code: int, tail: list[str], ran: bool = True) -> StageFailed:
    """StageInputError for bad input: the stage's error line where it exited BAD_INPUT, or DVC's own error where
    DVC stopped before running the stage (a dependency that is not there, such as a shard.path that does not
    exist: the same on every try; waiting for DVC's lock is the exception). StageFailed with the tail otherwise."""
    own = [line for line in tail if line.startswith(f"stage {stage}: error: ")]
    if stage_exit(tail) == BAD_INPUT and own:
        return StageInputError(own[-1])
    dvc = [line for line in tail if line.startswith("ERROR: ") and "lock" not in line]
    if not ran and dvc:
        return StageInputError(f"stage {stage}: error: {dvc[-1][len('ERROR: '):]}")
    return StageFailed(f"stage {stage} failed (exit {code}):\n" + "\n".join(tail))


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect's retry condition: any failure but a stage's bad input may pass on a second try."""
    return not isinstance(state.result(raise_on_failure=False), StageInputError)


def dvc_command(stage: str) -> list[str]:
    return [dvc_executable(), "repro", "--single-item", stage]


@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=retry_unless_bad_input, task_run_name="{stage}")
def run_stage(stage: str, root: str, parent_run_id: str | None):
    """One DVC stage; its output goes line by line to the Prefect log. 'ran', or a Completed state named
    Skipped (result 'skipped') when DVC found it up to date."""
    logger = get_run_logger()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    cmd = dvc_command(stage)
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    ran = False  # whether DVC got as far as running the stage's command
    level = OutputLevels()  # DEBUG for advice and known-benign noise, INFO for the rest
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.log(level(line), "%s", line)
            tail = (tail + [line])[-15:]
            ran = ran or line.startswith(f"Running stage '{stage}'")
    if proc.wait() != 0:
        error = stage_error(stage, proc.returncode, tail, ran)
        if ran:  # DVC deleted the stage's outputs before running it: dvc.lock still names the earlier ones
            restored, problems = restore(Path(root), stage)
            logger.info("restored the earlier outputs of %s: %s", stage, ", ".join(restored) or "none")
            for line in problems:
                logger.warning("could not restore: %s", line)
        raise error
    if any(SKIPPED in t for t in tail):
        return Completed(name="Skipped", message="up to date: DVC did not run it", data="skipped")
    if any(RESTORED in t for t in tail):
        return Completed(name="Restored", message="DVC's run-cache had this run: outputs checked out",
                         data="restored")
    return "ran"


@flow(name="cgspn-pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, root: str = str(REPO), stages: list[str] | None = None,
             push: bool = False) -> dict:
    """Run the DVC stages in order under one MLflow parent run; publish the headline figures and links.
    `push`: afterwards, the outputs and the run-cache go to the default DVC remote (flows.remote.push)."""
    from flows.tracking import ParentRun

    overrides, stages, rootp = list(overrides or []), list(stages or STAGES), Path(root)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown {unknown}; the pipeline's stages are {list(STAGES)}")
    for text in overrides:
        parse_override(text)  # a malformed override fails before anything runs
    name = flow_run.get_name() or "pipeline"
    outcome: dict[str, str] = {}
    try:
        with ParentRun(name, overrides, rootp) as parent, OverrideRun(rootp, overrides) as experiment:
            parent.log_params(rootp / "params.yaml")
            for line in missing_lines(rootp, "the workspace"):  # a fresh clone, a partial pull: in the run's log
                get_run_logger().info("%s", line)
            if "shard" in stages:  # what is at shard.path now: shard reruns only if that changed
                run_stage(LISTING_STAGE, root, parent.id, return_state=True).result()
            for stage in stages:
                state = run_stage(stage, root, parent.id, return_state=True)
                state.result()  # a failed stage (after its retries) raises its error here
                outcome[stage] = {"Skipped": "skipped", "Restored": "restored"}.get(state.name, "ran")
            ran = any(v != "skipped" for v in outcome.values())
            if ran:
                experiment.save(name)
                parent.finish(experiment.experiment, flow_run.get_id())
            else:
                parent.discard()
    except StageInputError as error:
        # Failed as a returned state: Prefect logs its one line, not the traceback of a raised error; calling
        # the flow still raises the error
        return Failed(message=str(error), data=error)
    if push:
        from flows.remote import push as dvc_push

        get_run_logger().info("%s", dvc_push(rootp))
    create_markdown_artifact(key="pipeline-run", markdown=parent.summary_markdown(outcome, experiment.experiment),
                             description="What ran, the headline figures, and where to look")
    return {"stages": outcome, "mlflow_parent_run": parent.id if ran else None, "dvc_experiment": experiment.experiment,
            "flow_run": name, "mlflow_report": parent.report_uri}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter override for this run only (repeatable); the run is one DVC experiment")
    parser.add_argument("--stages", nargs="+", default=None, help=f"a subset of {list(STAGES)}, in pipeline order")
    parser.add_argument("--root", default=str(REPO), help="the DVC repository to run (default: this one)")
    parser.add_argument("--push", action="store_true",
                        help="afterwards, push the outputs and the run-cache to the default DVC remote")
    args = parser.parse_args(argv)
    try:
        result = pipeline(overrides=args.set_param, root=args.root, stages=args.stages, push=args.push)
    except StageInputError as error:
        print(f"\n{error}", file=sys.stderr)
        sys.exit(BAD_INPUT)
    from flows.tracking import report_lines, runs_hint

    print(f"\nDone ({result['flow_run']}): {result['stages']}")
    if result["dvc_experiment"]:
        print(f"DVC experiment: {result['dvc_experiment']}  (dvc exp show; dvc exp apply {result['dvc_experiment']})")
    print("\n".join(report_lines(Path(args.root), result["dvc_experiment"], result["mlflow_report"])))
    print(runs_hint(result["mlflow_parent_run"]))
    print(prefect_hint())
    return result


def prefect_hint() -> str:
    """Where to see the flow's runs: the configured server's UI, or the command that serves this history (the
    temporary server kept it in PREFECT_HOME, <repo>/.prefect unless set; a bare `prefect server start`
    would read ~/.prefect and show none of it)."""
    api = os.environ.get("PREFECT_API_URL")
    if api:
        return f"Prefect:  {api.rstrip('/').removesuffix('/api')} (flow runs, logs, artifacts)"
    return (f"Prefect:  PREFECT_HOME={os.environ['PREFECT_HOME']} .venv/bin/prefect server start   then open "
            "http://127.0.0.1:4200 (flow runs, logs, artifacts)")


if __name__ == "__main__":
    main()
