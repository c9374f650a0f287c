"""Errors for bad input: each message names the file, key or parameter at fault.

A stage's command line turns these into one clear line on stderr and exit status 2 (cgspn.pipeline.cli);
anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input to a stage: a file, a record in it, or a parameter."""


class ParamError(InputError):
    """A parameter that is missing, unknown, of the wrong type or out of range."""


class ShardError(InputError):
    """A shard that is missing, corrupt, holds an undecodable record, or does not match its partner."""


class MissingLibraryError(InputError):
    """An optional library that the chosen input needs (a `timm:` teacher needs timm); says what to install."""


class ClusterError(InputError):
    """A Ray cluster the stage cannot use: unreachable, a node without the project's packages or without a
    folder the run needs, storage that not every node sees. Says which node and what to do."""
