"""Bytes moved by the PyTorch ops of one C-GSPN block around the scan kernels, counted without a GPU.

The block's GPU time outside the scan is mostly memory-bound glue (copies, elementwise ops, layout changes,
kernels/NOTES.md), so the bytes those ops read and write say how fast the block can get before it is timed.
This runs one block on the `meta` device (shapes, no data: nothing is computed, so it takes a second)
under a dispatch mode that adds up, for every ATen op that is not a view, the bytes of its tensor inputs
and outputs. The Triton kernels are launched as no-ops (their traffic is the kernel benchmark's business)
with the launch geometry of a GPU of `--sms` multiprocessors, so the ops around them are those that GPU runs.
Both mixer layouts are counted: `packed` (heads as one matmul in the LINES order, the triton path) and
`unpacked` (the 1x1 conv heads and the scan's own copies into the LINES layout, the layout before it).

    python -m benchmarks.block_traffic                      # width 1152, 2048 px, batch 1; prints both layouts
    python -m benchmarks.block_traffic --out reports/benchmarks/block-traffic.json
"""
from __future__ import annotations

import argparse
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.bench import provenance
from kernels.gspn import packed_op, triton_scan

from benchmarks.blocks import PATCH, make_block
from cgspn.pipeline.outputs import write_json


# Matrix products are compute-bound at these sizes; the rest is the memory-bound glue.
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm")


# Ops that read and write no tensor data: allocations, and reshapes that ATen runs as views.
MOVE_NOTHING = ("empty", "empty_strided", "empty_like", "new_empty", "_unsafe_view", "_reshape_alias")
# Our custom ops are opened: their Python implementations run inside the counter, so the ATen ops they run
# around the kernels (copies, sums) are counted one by one, and the kernels are not.
OPENED = {"cgspn::scan_4dir_packed": packed_op.packed_forward,
          "cgspn::scan_4dir_packed_backward": packed_op.packed_backward}


def glue_bytes(ops: dict) -> int:
    """Bytes of the memory-bound ops (everything but the matrix products) of one count."""
    return sum(b for op, b in ops.items() if op.split(".")[0] not in MATMUL_OPS)


def _nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))


class TrafficCounter(TorchDispatchMode):
    """Adds up the bytes read and written by every non-view ATen op run inside it, per op name."""

    def __init__(self):
        super().__init__()
        self.bytes = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in OPENED:
            with self:
                return OPENED[func._schema.name](*args, **kwargs)
        # Inside an opened op, composite ops (`to`, say) arrive whole, below the autograd layer that otherwise
        # splits them into the ops that move data (`_to_copy`): split them here the same way.
        with self:
            decomposed = func.decompose(*args, **kwargs)
        if decomposed is not NotImplemented:
            return decomposed
        out = func(*args, **kwargs)
        if not func.is_view and func.__name__.split(".")[0] not in MOVE_NOTHING:
            moved = _nbytes(torch.utils._pytree.tree_leaves((args, kwargs)))
            if not func._schema.is_mutable:  # an in-place op's output is one of its inputs, counted already
                moved += _nbytes(torch.utils._pytree.tree_leaves(out))
            self.bytes[func.__name__] += moved
        return out

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextmanager
def _kernels_stubbed(sms: int):
    """Triton kernels as no-ops, launched as on a GPU with `sms` multiprocessors."""
    names = ("gspn_fwd_kernel", "gspn_bwd_kernel", "_min_programs")
    saved = [getattr(triton_scan, n) for n in names]
    triton_scan.gspn_fwd_kernel = triton_scan.gspn_bwd_kernel = _NoLaunch()
    triton_scan._min_programs = lambda device: triton_scan.PROGRAMS_PER_SM * sms
    try:
        yield
    finally:
        for n, f in zip(names, saved):
            setattr(triton_scan, n, f)


def count_block(width: int, side: int, batch: int, packed: bool, sms: int = 132, dtype=torch.bfloat16) -> dict:
    """{"fwd": {op: bytes}, "fwd+bwd": {op: bytes}} of one C-GSPN block (triton backend) on a square image."""
    grid = side // PATCH
    block = make_block("cgspn" if packed else "cgspn-unpacked", width).to("meta", dtype)
    block.attn.cfg.backend = "triton"
    x = torch.randn(batch, grid * grid, width, dtype=dtype, device="meta", requires_grad=True)
    result = {}
    with _kernels_stubbed(sms):
        with torch.no_grad(), TrafficCounter() as fwd:
            block(x, hw=(grid, grid))
        with TrafficCounter() as both:
            y = block(x, hw=(grid, grid))
            torch.autograd.grad(y.float().square().mean(), [x, *block.parameters()])
    result["fwd"], result["fwd+bwd"] = dict(fwd.bytes.most_common()), dict(both.bytes.most_common())
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors of the GPU whose launches to count "
                        "(default: 132, an H100 SXM)")
    parser.add_argument("--copy-GBps", type=float, default=2969.0,
                        help="copy bandwidth to turn bytes into a time floor (default: measured on the H100, NOTES v2)")
    parser.add_argument("--copy-device", default="NVIDIA H100 80GB HBM3",
                        help="the device whose copy bandwidth --copy-GBps is (recorded beside it)")
    parser.add_argument("--out", type=Path, help="write the counts here as JSON")
    args = parser.parse_args(argv)
    report = {**provenance(f"meta device (counted, not timed; launch geometry of {args.sms} multiprocessors)"),
              "width": args.width, "side": args.side, "batch": args.batch, "dtype": "bfloat16",
              "method": "bytes of inputs and outputs of every non-view ATen op of one block, Triton kernels not "
                        f"counted; counted on the meta device with the launch geometry of {args.sms} multiprocessors", "copy_GBps": args.copy_GBps,
              "copy_GBps_device": args.copy_device, "layouts": {}}
    for layout in ("unpacked", "packed"):
        counts = count_block(args.width, args.side, args.batch, layout == "packed", args.sms)
        report["layouts"][layout] = {mode: {"all_MB": sum(ops.values()) / 1e6, "glue_MB": glue_bytes(ops) / 1e6,
                                            "glue_floor_ms": glue_bytes(ops) / args.copy_GBps / 1e6,
                                            "ops_MB": {op: b / 1e6 for op, b in ops.items()}}
                                     for mode, ops in counts.items()}
        for mode, ops in counts.items():
            glue = glue_bytes(ops)
            top = ", ".join(f"{op} {b / 1e6:.0f}" for op, b in list(ops.items())[:8])
            print(f"{layout:>8} {mode:>7}: all ops {sum(ops.values()) / 1e6:6.0f} MB; without matmuls {glue / 1e6:6.0f} MB"
                  f" = {glue / args.copy_GBps / 1e6:.3f} ms at {args.copy_GBps:.0f} GB/s (top, MB: {top})")
    if args.out:
        write_json(args.out, report)  # makes the folder
    return report


if __name__ == "__main__":
    main()
