"""Serve the pipeline flow as a Prefect deployment on a schedule.

    .venv/bin/prefect server start                 # terminal 1: the UI at http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m flows.serve --cron "0 3 * * *"

The deployment `cgspn-pipeline/nightly` then shows in the UI, runs on the cron schedule, and can be
started by hand from there (with parameter overrides, which go through `dvc exp run --set-param`).
"""
from __future__ import annotations

import argparse

from flows.pipeline import pipeline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cron", default="0 3 * * *", help="schedule (default: every day at 03:00)")
    parser.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    args = parser.parse_args(argv)
    pipeline.serve(name=args.name, cron=args.cron, tags=["cgspn"],
                   description="The C-GSPN pipeline: every DVC stage in order, one MLflow parent run.")


if __name__ == "__main__":
    main()
