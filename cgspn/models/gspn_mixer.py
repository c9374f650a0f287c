"""The compressed latent-space propagation mixer: C-GSPN's replacement for attention.

tokens [B, h*w, C] -> in-projection to a small proxy width Cp -> depthwise 3x3 conv (locality) -> heads
predicting gate logits, lam and u for four directions -> `gspn_scan_4dir` in the proxy space -> learned
merge of the four directions -> LayerNorm -> out-projection back to C. Propagation costs O(h*w*Cp),
linear in the number of tokens, where attention costs O((h*w)^2 * C).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.gspn import BACKENDS, choose_backend, gspn_scan_4dir, gspn_scan_4dir_packed
from kernels.gspn.lines_order import row_and_column_major


@dataclass
class GSPNMixerConfig:
    proxy_dim: int = 96  # Cp
    groups: int = 4  # G gate groups per direction (G = 1: one propagation shared by all proxy channels)
    chunk: int | None = None  # restart the scan every `chunk` lines (local GSPN); None: global
    backend: str | None = None  # kernels.gspn backend; None picks by device


class GSPNMixer(nn.Module):
    """tokens [B, h*w, C] and the grid (h, w) -> [B, h*w, C]."""

    def __init__(self, dim: int, cfg: GSPNMixerConfig = GSPNMixerConfig()):
        super().__init__()
        Cp, G = cfg.proxy_dim, cfg.groups
        if Cp < 1 or G < 1 or Cp % G:
            raise ValueError(f"GSPNMixerConfig: groups={G} must divide proxy_dim={Cp} (both positive)")
        if cfg.chunk is not None and (isinstance(cfg.chunk, bool) or not isinstance(cfg.chunk, int) or cfg.chunk < 1):
            raise ValueError(f"GSPNMixerConfig: chunk must be None or a positive int, got {cfg.chunk!r}")
        if cfg.backend is not None and cfg.backend not in BACKENDS:
            raise ValueError(f"GSPNMixerConfig: backend must be None or one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
        self.cfg = cfg
        self.in_proj = nn.Linear(dim, Cp)
        self.local = nn.Conv2d(Cp, Cp, 3, padding=1, groups=Cp)
        self.act = nn.GELU()
        # Gates are shared by groups (compact propagation: few bytes per pixel); lam and u stay per proxy
        # channel, since they decide what each channel writes and reads and cost only 2*Cp outputs per direction.
        self.heads = nn.Conv2d(Cp, 4 * (3 * G + 2 * Cp), 1)
        self.merge_logits = nn.Parameter(torch.zeros(4, Cp))
        self.norm = nn.LayerNorm(Cp)
        self.out_proj = nn.Linear(Cp, dim)
        self._init_heads()

    def _init_heads(self) -> None:
        """Start as an even diffusion: neutral gates, lam = sigmoid(0) = 1/2, u = 1; small input dependence."""
        nn.init.normal_(self.heads.weight, std=1e-3)
        G, Cp = self.cfg.groups, self.cfg.proxy_dim
        bias = torch.zeros(4, 3 * G + 2 * Cp)
        bias[:, 3 * G + Cp :] = 1.0  # u
        with torch.no_grad():
            self.heads.bias.copy_(bias.flatten())

    def forward(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, _ = tokens.shape
        h, w = hw
        if h * w != N:
            raise ValueError(f"GSPNMixer: grid {h}x{w} does not hold {N} tokens")
        z = self.in_proj(tokens).transpose(1, 2).reshape(B, self.cfg.proxy_dim, h, w)  # (B, Cp, h, w)
        z = self.act(self.local(z))
        if choose_backend(self.cfg.backend, z) == "triton":
            y = self._propagate_packed(z)
        else:
            y = self._propagate(z)
        return self.out_proj(self.norm(y))

    def _propagate(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, Cp, h, w] -> heads -> four-direction scan -> merge: [B, h*w, Cp]."""
        B, Cp, h, w = z.shape
        G = self.cfg.groups
        heads = self.heads(z).view(B, 4, 3 * G + 2 * Cp, h, w)
        gates = heads[:, :, : 3 * G].reshape(B, 4, G, 3, h, w)
        # lam in (0, 1) is an input gate (a token can be skipped). Rows of propagation sum to 1, so h grows at
        # most linearly along the scan (|h_i| <= (i+1) max|lam x|); the LayerNorm after the merge removes that scale.
        lam = torch.sigmoid(heads[:, :, 3 * G : 3 * G + Cp])  # (B, 4, Cp, h, w)
        u = heads[:, :, 3 * G + Cp :]
        ys = gspn_scan_4dir(z, gates, lam, u, chunk=self.cfg.chunk, backend=self.cfg.backend)  # (B, 4, Cp, h, w)
        merge = torch.softmax(self.merge_logits, dim=0).to(ys.dtype)  # (4, Cp), per-channel weights over directions
        return torch.einsum("bdchw,dc->bhwc", ys, merge).reshape(B, h * w, Cp)

    def _propagate_packed(self, z: torch.Tensor) -> torch.Tensor:
        """`_propagate` laid out for the fused kernels (same parameters, same result up to rounding).

        The heads are one matmul over z in row-major order (tb, bt) and column-major order (lr, rl), which
        writes every direction's inputs in the LINES order that the kernels read in place (no layout copies),
        and the sigmoid of lam is applied inside the scan; the two halves of the output are merged in their
        own orders. On a GPU this removes the conv's layout conversions and the copies into the LINES layout.
        """
        B, Cp, h, w = z.shape
        G = self.cfg.groups
        K = 3 * G + 2 * Cp
        # The bias rides in the matmul as one more input row of ones (padded to 8 rows so that the inner dimension
        # stays a multiple of 8 for the GPU's tensor cores): a separate bias add would read and write all the heads.
        ones = torch.zeros(8, h * w, dtype=z.dtype, device=z.device)
        ones[0] = 1
        orders = row_and_column_major(z, extra_rows=ones)  # (B, 2, Cp + 8, h*w)
        weight = torch.cat((self.heads.weight.view(2, 2 * K, Cp), self.heads.bias.view(2, 2 * K, 1),
                            self.heads.bias.new_zeros(2, 2 * K, 7)), dim=2)
        heads = torch.matmul(weight, orders)  # (B, 2, 2K, h*w): tb, bt from row-major z; lr, rl from column-major
        ys = gspn_scan_4dir_packed(z, heads.view(B, 4, K, h * w), (G, Cp, Cp), chunk=self.cfg.chunk,
                                   backend=self.cfg.backend)  # (B, 4, Cp, h*w), LINES order
        merge = torch.softmax(self.merge_logits, dim=0).to(ys.dtype)
        rows = torch.einsum("bdcn,dc->bnc", ys[:, :2], merge[:2])  # tb + bt, tokens in row-major order
        cols = torch.einsum("bdcn,dc->bnc", ys[:, 2:], merge[2:])  # lr + rl, tokens in column-major order
        return (rows.unflatten(1, (h, w)) + cols.unflatten(1, (w, h)).transpose(1, 2)).flatten(1, 2)
