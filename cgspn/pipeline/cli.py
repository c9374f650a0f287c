"""The command line every stage shares: read its params section, open its MLflow run, turn bad input
into one clear line and exit status 2.

    # stages/shard.py
    def main(params: dict, root: Path, run: StageRun) -> dict: ...
    if __name__ == "__main__":
        run_stage("shard", SCHEMA, main)

`python -m stages.<name> [--params params.yaml] [--root .]`; outputs go under `--root`, as dvc.yaml says.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from cgspn.pipeline.errors import InputError, ParamError
from cgspn.pipeline.params import Param, load_section
from cgspn.pipeline.quiet_env import set_defaults

BAD_INPUT = 2  # the exit status for bad input: the flow does not retry a stage that exits with it


def run_stage(name: str, schema: dict[str, Param], main: Callable, argv: list[str] | None = None,
              section: str | None = None, tracked: bool = True) -> dict:
    """`section`: the params.yaml section to read (default: the stage's name); `tracked` False: no MLflow
    run (a stage that runs on every `dvc repro`, such as data_listing, would leave one each time)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=(main.__doc__ or "").strip())
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="folder the stage's outputs are relative to (default: .)")
    args = parser.parse_args(argv)
    set_defaults()
    try:
        params = load_section(args.params, section or name, schema)
        if not tracked:
            return main(params, Path(args.root), None)
        from cgspn.pipeline.tracking import stage_run

        with stage_run(name, params) as run:
            return main(params, Path(args.root), run)
    except (InputError, FileNotFoundError) as e:
        print(f"\nstage {name}: error: {error_line(e, args.params)}", file=sys.stderr)
        print_restore_hint(name)
        sys.exit(BAD_INPUT)
    except BaseException:
        print_restore_hint(name)
        raise


def print_restore_hint(name: str) -> None:
    """Under `dvc repro` (which sets DVC_STAGE and DVC_ROOT), a stage whose outputs are not `persist` failed
    after DVC deleted its earlier outputs: name the command that puts them back (cgspn.pipeline.restore)."""
    from cgspn.pipeline.restore import removes_outputs

    root = os.environ.get("DVC_ROOT")
    if os.environ.get("DVC_STAGE") == name and root and removes_outputs(Path(root), name):
        print(f"stage {name}: DVC removed its earlier outputs before this run; put them back with: "
              f"python -m cgspn.pipeline.restore {name}", file=sys.stderr)


def error_line(e: Exception, params_file: str) -> str:
    """One line for a bad-input error: a parameter's error names the parameters file that was read."""
    cause = getattr(e, "cause", None)  # an error raised on a Ray worker carries the original here
    e = cause if isinstance(cause, Exception) else e
    text = " ".join(str(e).split())
    return f"{params_file}: {text}" if isinstance(e, ParamError) else text
