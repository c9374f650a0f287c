"""The byte counter behind reports/benchmarks/block-traffic.json: exact on ops whose traffic is known, and the
stubs it uses to count a block leave the kernels as they were."""
import torch

from benchmarks.block_traffic import TrafficCounter, count_block, glue_bytes
from kernels.gspn import triton_scan


def test_counter_counts_reads_and_writes_not_views():
    n = int(torch.randint(10, 1000, ()))
    a, b = torch.randn(n), torch.randn(n, dtype=torch.float64)
    with TrafficCounter() as c:
        a.view(1, n).transpose(0, 1)  # views: nothing moves
        a + a  # two reads and one write of n float32
        b.mul_(2)  # in place: self read (and written), counted once
        torch.mm(a.view(n, 1), a.view(1, n))
    assert c.bytes["add.Tensor"] == 3 * 4 * n
    assert c.bytes["mul_.Tensor"] == 8 * n
    assert set(c.bytes) == {"add.Tensor", "mul_.Tensor", "mm.default"}
    assert glue_bytes(c.bytes) == c.total - c.bytes["mm.default"] == 3 * 4 * n + 8 * n


def test_block_count_restores_the_kernels_and_sees_both_layouts():
    saved = triton_scan.gspn_fwd_kernel, triton_scan.gspn_bwd_kernel, triton_scan._min_programs
    packed = count_block(96, 256, 2, packed=True)
    unpacked = count_block(96, 256, 2, packed=False)
    assert (triton_scan.gspn_fwd_kernel, triton_scan.gspn_bwd_kernel, triton_scan._min_programs) == saved
    # The 1x1 conv heads and the sigmoid of lam exist only in the unpacked layout; the packed heads are a bmm.
    assert "sigmoid.default" in unpacked["fwd"] and "sigmoid.default" not in packed["fwd"]
    assert packed["fwd"]["bmm.default"] > unpacked["fwd"].get("bmm.default", 0)
    for mode in ("fwd", "fwd+bwd"):
        assert glue_bytes(packed[mode]) < glue_bytes(unpacked[mode])
    # The scan's custom op is opened, not counted whole: inside it, x (B 2, proxy width 96/4, 16x16 tokens,
    # bf16) is copied into the pair the kernels read (x and its transposed planes): two reads and two writes.
    # The only other copy is the heads' bias row of ones (`ones[0] = 1`: 16x16 bf16, source and destination).
    assert not any(op.startswith("scan_4dir_packed") for mode in packed.values() for op in mode)
    assert packed["fwd"]["copy_.default"] == 4 * (2 * 24 * 16 * 16 * 2) + 2 * (16 * 16 * 2)


def test_unpacked_baseline_block_matches_the_packed_block():
    """The benchmark's baseline (`cgspn-unpacked`) and the packed block compute the same function on the
    triton backend (Triton's interpreter here): same parameters, outputs and input gradients."""
    from benchmarks.blocks import make_block

    torch.manual_seed(0)
    packed, unpacked = make_block("cgspn", 64), make_block("cgspn-unpacked", 64)
    unpacked.load_state_dict(packed.state_dict())
    with torch.no_grad():  # away from the near-neutral initialization, so that the heads matter
        for p in packed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unpacked.load_state_dict(packed.state_dict())
    x = torch.randn(2, 3 * 5, 64)
    outs = []
    for block in (packed, unpacked):
        block.attn.cfg.backend = "triton"
        xi = x.clone().requires_grad_(True)
        y = block(xi, hw=(3, 5))
        outs.append((y.detach(), torch.autograd.grad(y.square().sum(), xi)[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)
