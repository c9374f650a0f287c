"""Serve the pipeline flow as a Prefect deployment on a schedule.

    .venv/bin/prefect server start                 # terminal 1: the UI at http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m flows.serve --cron "0 3 * * *"

The deployment `cgspn-pipeline/nightly` then shows in the UI, runs on the cron schedule (or every
`--interval SECONDS`), and can be
started by hand from there (with parameter overrides: each such run is one DVC experiment, flows.experiment).
For a team's work pool, with runs in a fresh clone at a fixed commit, see prefect.yaml and docs/team.md.
"""
from __future__ import annotations

import argparse

from cgspn.pipeline.names import STAGES
from flows.pipeline import REPO, pipeline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cron", default=None, help="cron schedule (default: '0 3 * * *', every day at 03:00)")
    when.add_argument("--interval", type=float, default=None, metavar="SECONDS",
                      help="a run every SECONDS instead of a cron schedule (e.g. 21600: every 6 hours)")
    parser.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    parser.add_argument("--root", default=str(REPO), help="the DVC repository to run (default: this one)")
    parser.add_argument("--stages", nargs="+", default=None, help=f"a subset of {list(STAGES)} (default: all)")
    args = parser.parse_args(argv)
    parameters = {"root": args.root, **({"stages": args.stages} if args.stages else {})}
    if args.interval is not None and not args.interval > 0:
        parser.error(f"--interval must be a positive number of seconds, got {args.interval}")
    schedule = {"interval": args.interval} if args.interval is not None else {"cron": args.cron or "0 3 * * *"}
    pipeline.serve(name=args.name, **schedule, tags=["cgspn"], parameters=parameters,
                   description="The C-GSPN pipeline: every DVC stage in order, one MLflow parent run.")


if __name__ == "__main__":
    main()
