"""Compile the GSPN Triton kernels for a GPU target without a GPU, and report registers and spills.

The CPU tests run the kernels in Triton's interpreter, which never sees the GPU compiler. This compiles
every kernel variant for Hopper (sm_90) to a cubin and reads its resource report (cuobjdump), so that a
kernel that would not compile, or that spills to local memory, shows up on a machine with no GPU.

    TRITON_INTERPRET=0 python -m kernels.gspn.compile_check

Must run in a process where Triton is not in interpreter mode (the variable has to be 0 before import).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# (name, kernel, dtype, BLOCK_C, BLOCK_L, SHARED_A, SHARED_L, SHARED_U, HAS_U, PACKED); PACKED: the LINES
# layout with lam as logits (what `gspn_scan_4dir_packed` launches for the C-GSPN mixer).
VARIANTS = [
    ("fwd-compact-bf16", "gspn_fwd_kernel", "bf16", 8, 128, True, False, False, True, False),
    ("fwd-perchannel-f32", "gspn_fwd_kernel", "fp32", 1, 1024, False, False, False, False, False),
    ("fwd-shared-all-f64", "gspn_fwd_kernel", "fp64", 4, 64, True, True, True, True, False),
    ("fwd-packed-bf16", "gspn_fwd_kernel", "bf16", 2, 128, True, False, False, True, True),
    ("bwd-compact-bf16", "gspn_bwd_kernel", "bf16", 8, 128, True, False, False, True, False),
    ("bwd-perchannel-f32", "gspn_bwd_kernel", "fp32", 1, 1024, False, False, False, False, False),
    ("bwd-shared-all-f32", "gspn_bwd_kernel", "fp32", 4, 64, True, True, True, True, False),
    ("bwd-packed-bf16", "gspn_bwd_kernel", "bf16", 2, 128, True, False, False, True, True),
]
SCRATCH = {"scratch"}
GRADS = {"dx", "da", "dlam", "du"}


def _resource_usage(cubin: bytes) -> str:
    """cuobjdump's resource report (registers, spills, shared memory) of a compiled kernel."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"cuobjdump failed: {out.stderr or out.stdout}")
    return out.stdout


def compile_variants(capability: int = 90) -> list[dict]:
    """Compile each variant for sm_<capability>; returns rows with registers, spills and shared memory."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.gspn import triton_scan

    acc = {"bf16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}
    rows = []
    for name, kernel, dtype, bc, bl, sa, sl, su, has_u, packed in VARIANTS:
        fn = getattr(triton_scan, kernel)
        const = dict(
            BLOCK_C=bc, BLOCK_L=bl, SHARED_A=sa, SHARED_L=sl, SHARED_U=su, HAS_U=has_u, ACC=acc[dtype],
            PREFETCH=triton_scan.PREFETCH, LINES=packed, LAM_LOGITS=packed,
        )
        if kernel == "gspn_fwd_kernel":
            const["STORE_H"] = has_u
        scratch_dtype = "fp64" if dtype == "fp64" else "fp32"
        signature = {}
        for arg in fn.arg_names:
            if arg in const:
                signature[arg] = "constexpr"
            elif arg in SCRATCH:
                signature[arg] = f"*{scratch_dtype}"
            elif arg in GRADS:
                signature[arg] = f"*{scratch_dtype}"
            elif arg[0].islower() and arg in ("x", "a", "lam", "u", "y", "h_out", "h_in", "dy"):
                signature[arg] = f"*{dtype}"
            else:
                signature[arg] = "i32"
        compiled = triton.compile(
            ASTSource(fn, signature, const), target=GPUTarget("cuda", capability, 32),
            options={"num_warps": triton_scan.num_warps_for(bc * bl)},
        )
        report = _resource_usage(compiled.asm["cubin"])
        regs = re.search(r"REG:(\d+)", report)
        stack = re.search(r"STACK:(\d+)", report)
        local = re.search(r"LOCAL:(\d+)", report)
        rows.append(
            dict(
                variant=name, registers=int(regs.group(1)) if regs else None,
                stack_bytes=int(stack.group(1)) if stack else None, local_bytes=int(local.group(1)) if local else None,
                shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                cubin_bytes=len(compiled.asm["cubin"]),
            )
        )
    return rows


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("compile_check: TRITON_INTERPRET=1 is set; run with TRITON_INTERPRET=0 to use the GPU compiler")
    rows = compile_variants()
    print(f"{'variant':<22} {'regs':>5} {'stack':>6} {'local':>6} {'smem':>6} {'warps':>5} {'cubin':>7}  (sm_90)")
    for r in rows:
        print(
            f"{r['variant']:<22} {r['registers']:>5} {r['stack_bytes']:>6} {r['local_bytes']:>6} "
            f"{r['shared_bytes']:>6} {r['num_warps']:>5} {r['cubin_bytes']:>7}"
        )


if __name__ == "__main__":
    main()
