"""Serve the pipeline flow as a Prefect deployment on a schedule.

    .venv/bin/prefect server start                 # terminal 1: the UI at http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m flows.serve --cron "0 3 * * *"

The deployment `cgspn-pipeline/nightly` then shows in the UI, runs on the cron schedule, and can be
started by hand from there (with parameter overrides, which go through `dvc exp run --set-param`).
"""
from __future__ import annotations

import argparse

from flows.pipeline import REPO, STAGES, pipeline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cron", default="0 3 * * *", help="schedule (default: every day at 03:00)")
    parser.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    parser.add_argument("--root", default=str(REPO), help="the DVC repository to run (default: this one)")
    parser.add_argument("--stages", nargs="+", default=None, help=f"a subset of {STAGES} (default: all)")
    args = parser.parse_args(argv)
    parameters = {"root": args.root, **({"stages": args.stages} if args.stages else {})}
    pipeline.serve(name=args.name, cron=args.cron, tags=["cgspn"], parameters=parameters,
                   description="The C-GSPN pipeline: every DVC stage in order, one MLflow parent run.")


if __name__ == "__main__":
    main()
