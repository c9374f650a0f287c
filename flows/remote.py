"""The team's DVC remote: how a pipeline's results travel between clones, workers and people (docs/team.md).

    python -m flows.remote pull    # after a clone: what dvc.lock names, and the run-cache
    python -m flows.remote push    # after a run: the outputs and the run-cache

pull runs `dvc pull --run-cache --allow-missing`, then names each stage whose outputs the remote did not
have (a dvc.lock committed without a push, such as this repository's own, made on the machine that ran the
pipeline): `make demo` or `dvc repro` computes those, or restores them from the run-cache where the remote
had a run with the same inputs. push runs `dvc push --run-cache`: the outputs dvc.lock names and every
stage run's record, so that anyone who pulls gets "is cached - skipping run" for those parameters.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from cgspn.pipeline.cli import BAD_INPUT
from cgspn.pipeline.errors import InputError
from cgspn.pipeline.restore import dvc_executable


class RemoteError(InputError):
    """No remote, or one DVC cannot reach: the same on every try."""


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`dvc <args>` in `root` with this environment's dvc, its output captured."""
    return subprocess.run([dvc_executable(), *args], cwd=root, capture_output=True, text=True)


def check_remote(root: Path) -> str:
    """The default remote's name; RemoteError when there is none."""
    names = [line.split()[0] for line in dvc(root, "remote", "list").stdout.splitlines() if line.strip()]
    default = dvc(root, "config", "core.remote").stdout.strip()
    if not default:
        raise RemoteError(f"{Path(root).resolve()}: no default DVC remote (remotes: {', '.join(names) or 'none'}); "
                          "add the team's with `dvc remote add -d team s3://bucket/cgspn` (or a shared folder) and "
                          "commit .dvc/config (docs/team.md)")
    return default


def missing_outputs(root: Path) -> dict[str, list[str]]:
    """{stage: [its outputs that are not in the workspace]} from `dvc status` (data_listing, always changed,
    aside)."""
    done = dvc(root, "status", "--json")
    status = json.loads(done.stdout or "{}") if done.returncode == 0 else {}
    missing = {}
    for stage, changes in status.items():
        for change in changes:
            outs = change.get("changed outs", {}) if isinstance(change, dict) else {}
            paths = [path for path, state in outs.items() if state in ("deleted", "not in cache")]
            if paths:
                missing.setdefault(stage, []).extend(paths)
    return missing


def missing_lines(root: Path, holder: str) -> list[str]:
    """One line per stage whose outputs are not in the workspace: `holder` lacks them, and what happens next."""
    return [f"{holder} lacks {', '.join(paths)} (stage {stage}): `make demo` or `dvc repro` computes them, or "
            "restores them from the run-cache" for stage, paths in missing_outputs(root).items()]


def pull(root: Path) -> list[str]:
    """Everything the default remote holds of dvc.lock and the run-cache -> a line per stage it lacked."""
    remote = check_remote(root)
    print(f"dvc pull --run-cache from remote {remote!r}", flush=True)
    done = dvc(root, "pull", "--run-cache", "--allow-missing")
    if done.returncode != 0:
        raise RemoteError(f"dvc pull from remote {remote!r} failed: " + last_error(done))
    lines = missing_lines(root, f"remote {remote!r}")
    print("\n".join(lines) or f"every output dvc.lock names came from remote {remote!r}", flush=True)
    return lines


def push(root: Path) -> str:
    """The outputs dvc.lock names and the run-cache to the default remote -> DVC's summary line."""
    remote = check_remote(root)
    done = dvc(root, "push", "--run-cache")
    if done.returncode != 0:
        raise RemoteError(f"dvc push to remote {remote!r} failed: " + last_error(done))
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return f"dvc push --run-cache to remote {remote!r}: {lines[-1] if lines else 'done'}"


def last_error(done: subprocess.CompletedProcess) -> str:
    errors = [line for line in (done.stderr + done.stdout).splitlines() if line.startswith("ERROR")]
    return " ".join((errors[-1] if errors else (done.stderr or done.stdout).strip()[-500:]).split())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["pull", "push"])
    parser.add_argument("--root", default=".", help="the DVC repository (default: .)")
    args = parser.parse_args(argv)
    try:
        if args.action == "pull":
            pull(Path(args.root))
        else:
            print(push(Path(args.root)))
    except RemoteError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(BAD_INPUT)


if __name__ == "__main__":
    main()
