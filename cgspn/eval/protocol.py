"""The evaluation interface: what one protocol (kNN, the segmentation probe, fidelity, the ImageNet readout,
or your own) does, the context the evaluate stage hands it, and the one registry of protocols.

A new evaluation is one module with a `Protocol` subclass, added to `protocols()` below (or, from code of
your own, `register(MyProtocol())` before the stage runs). Its figures land in reports/metrics/evaluate.json
(per model under "models", or at the top level from `finish`), its reason under "not_measured" where the
data does not allow it, its lines in the stage's log, and its section in reports/REPORT.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cgspn.eval.features import Encoder, FeatureStore


@dataclass
class Context:
    """What the evaluate stage knows: its params `p`, the pipeline root, the device, the training resolution
    `base` (px), the splits (cgspn.pipeline.inputs.Splits), the models (`encoders`, the teacher first), the
    shared feature store and the students' other teachers (`others`); `used` collects the splits each protocol chose, `say` prints a progress line."""

    p: dict
    root: Path
    device: str
    base: int
    splits: object
    encoders: dict[str, Encoder]
    store: FeatureStore
    others: dict = field(default_factory=dict)  # {teacher: OtherTeacher}: the students' other teachers
    used: dict = field(default_factory=dict)
    say: object = print


class Protocol:
    """One evaluation. Subclasses set `name` (its key under "not_measured" and "splits") and override what
    they need; every method has a do-nothing default."""

    name = "protocol"
    title = "protocol"  # how the log names it

    def prepare(self, ctx: Context) -> str | None:
        """Check the data and choose the splits (record them in ctx.used[self.name]); return why the
        protocol cannot be measured on this data, or None. Raise ParamError for a bad parameter."""
        return None

    def measure(self, ctx: Context, model: str) -> dict:
        """The figures of one model: merged into evaluate.json's models[model]."""
        return {}

    def empty(self) -> dict:
        """What models[model] holds for this protocol where the data does not allow it (its keys with no
        figures), so that every evaluate.json has the same keys."""
        return {}

    def finish(self, ctx: Context, results: dict[str, dict]) -> dict:
        """Figures over all models (after every model's `measure`): merged into evaluate.json's top level."""
        return {}

    def line(self, r: dict) -> list[str]:
        """Parts of the log's one-line summary of a model's figures `r`."""
        return []

    def report_lines(self, ev: dict, names: dict[str, str]) -> list[str]:
        """Markdown lines for REPORT.md from evaluate.json `ev`; names: model -> its display name."""
        return []


_EXTRA: list[Protocol] = []


def register(protocol: Protocol) -> Protocol:
    """Add a protocol of your own to every later evaluate run in this process (after the built-in ones)."""
    if any(p.name == protocol.name for p in protocols()):
        raise ValueError(f"an evaluation protocol named {protocol.name!r} is already registered")
    _EXTRA.append(protocol)
    return protocol


def unregister(name: str) -> None:
    _EXTRA[:] = [p for p in _EXTRA if p.name != name]


def protocols() -> list[Protocol]:
    """The protocols evaluate runs, in order: the built-in ones, then those registered."""
    from cgspn.eval.fidelity import Fidelity
    from cgspn.eval.imagenet_readout import ImageNetReadout
    from cgspn.eval.knn import KNN
    from cgspn.eval.segmentation import SegmentationProbe

    return [KNN(), SegmentationProbe(), Fidelity(), ImageNetReadout(), *_EXTRA]


def round4(x) -> float | None:
    """A figure as evaluate.json keeps it: 4 decimals (0.01 points of a percentage), so that a rerun that
    differs in the 7th digit, as floating point on another machine does, writes the same file."""
    return None if x is None else round(float(x), 4)
