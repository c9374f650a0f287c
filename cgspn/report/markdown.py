"""Markdown pieces every report section uses: tables and percentages."""
from __future__ import annotations


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal; '-' for None."""
    return "-" if x is None else f"{100 * x:.1f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
