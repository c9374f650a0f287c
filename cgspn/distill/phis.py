"""PHI-S standardization of teacher features (Ranzinger et al., 2024, "PHI-S").

Centre with the mean, rotate into the principal axes, then spread the variance evenly over every
dimension with a Hadamard matrix, and divide by one scalar:

    z = H U^T (x - mu) / alpha,   alpha = sqrt(mean eigenvalue of the covariance)

Every dimension of z then has variance 1 while the geometry (angles, relative distances) of x is kept,
because the whole map is a rotation and one isotropic scale. Statistics are estimated in float64 from
running sums, so they can be accumulated shard by shard on different workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _paley(q: int) -> np.ndarray:
    """Hadamard matrix of order q + 1 for a prime q = 3 (mod 4) (Paley construction I)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
    Q = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    H = np.ones((q + 1, q + 1), dtype=np.int64)
    H[1:, 0] = -1
    H[1:, 1:] = Q + np.eye(q, dtype=np.int64)
    return H


def hadamard(n: int) -> np.ndarray:
    """An n x n matrix of +-1 with H H^T = n I, for n = 2^k * m where m is 1, 2 or q + 1 (q prime = 3 mod 4).

    That covers the usual widths: 384 = 12 * 32, 768, 1024, 1152 = 1151 + 1, 1280 = 20 * 64, 1536.
    """
    base = np.array([[1]], dtype=np.int64)
    k = 0
    while n % (2 ** (k + 1)) == 0:
        k += 1
    for j in range(k, -1, -1):
        m = n // 2**j
        if m == 1:
            base = np.array([[1]], dtype=np.int64)
        elif m == 2:
            base = np.array([[1, 1], [1, -1]], dtype=np.int64)
        elif _is_prime(m - 1) and (m - 1) % 4 == 3:
            base = _paley(m - 1)
        else:
            continue
        H = base
        for _ in range(j):
            H = np.block([[H, H], [H, -H]])
        return H
    raise ValueError(f"PHI-S: no Hadamard construction here for width {n} (need 2^k * (q+1), q prime = 3 mod 4)")


@dataclass
class Moments:
    """Running float64 sums over feature vectors of width D."""

    count: int
    total: np.ndarray  # [D]
    outer: np.ndarray  # [D, D]

    @classmethod
    def of(cls, x: np.ndarray | torch.Tensor) -> "Moments":
        """x: [..., D] -> the sums over every vector in it."""
        x = torch.as_tensor(x).reshape(-1, torch.as_tensor(x).shape[-1]).double()
        return cls(x.shape[0], x.sum(0).numpy(), (x.T @ x).numpy())

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.count + other.count, self.total + other.total, self.outer + other.outer)


@dataclass
class PhiS:
    mean: np.ndarray  # [D] float64
    rotation: np.ndarray  # [D, D] float64, H U^T / sqrt(D): orthogonal
    scale: float  # alpha
    eigenvalues: np.ndarray  # [D], descending, for reports

    @classmethod
    def estimate(cls, m: Moments) -> "PhiS":
        if m.count < 2:
            raise ValueError(f"PHI-S: need at least 2 feature vectors, got {m.count}")
        mean = m.total / m.count
        cov = m.outer / m.count - np.outer(mean, mean)
        eigenvalues, U = np.linalg.eigh((cov + cov.T) / 2)
        eigenvalues, U = np.clip(eigenvalues[::-1], 0, None), U[:, ::-1]
        D = len(mean)
        rotation = hadamard(D).astype(np.float64) / np.sqrt(D) @ U.T
        return cls(mean, rotation, float(np.sqrt(eigenvalues.mean())), eigenvalues)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> z [..., D] with every dimension at unit variance over the estimation set."""
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
        rot = torch.as_tensor(self.rotation, dtype=x.dtype, device=x.device)
        return (x - mean) @ rot.T / self.scale

    def destandardize(self, z: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=z.dtype, device=z.device)
        rot = torch.as_tensor(self.rotation, dtype=z.dtype, device=z.device)
        return z * self.scale @ rot + mean

    def from_direction(self, z: torch.Tensor) -> torch.Tensor:
        """A prediction [..., D] trained under a cosine loss in standardized space has a direction but no
        meaningful norm: set it to the estimation set's root-mean-square norm (sqrt(D) there, each dimension
        having unit variance) and de-standardize."""
        return self.destandardize(torch.nn.functional.normalize(z, dim=-1) * z.shape[-1] ** 0.5)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        from cgspn.pipeline.outputs import atomic_write

        tensors = {"mean": self.mean, "rotation": self.rotation, "scale": np.array([self.scale]),
                   "eigenvalues": self.eigenvalues}
        return atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                                        str(tmp)))

    @classmethod
    def load(cls, path: str | Path) -> "PhiS":
        from safetensors.numpy import load_file

        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no PHI-S statistics (run the cache_teacher stage)")
        t = load_file(str(path))
        return cls(t["mean"], t["rotation"], float(t["scale"][0]), t["eigenvalues"])


PHIS_FILES = {"spatial": "phis.safetensors", "summary": "phis_summary.safetensors"}


def phis_file(kind: str) -> str:
    """The statistics file of a feature kind: "spatial", "summary", or "block<k>" (an intermediate block)."""
    return PHIS_FILES.get(kind, f"phis_{kind}.safetensors")


def load_teacher_phis(feature_dir: str | Path) -> dict[str, PhiS]:
    """{"spatial": PhiS of the patch features, "summary": PhiS of the summary vectors, "block<k>": PhiS of
    block k's patch tokens for every cached block} from a teacher's feature cache (the cache_teacher stage)."""
    import json

    meta = Path(feature_dir) / "meta.json"
    blocks = json.loads(meta.read_text()).get("layers", []) if meta.exists() else []
    kinds = [*PHIS_FILES, *(f"block{k}" for k in blocks)]
    return {kind: PhiS.load(Path(feature_dir) / phis_file(kind)) for kind in kinds}
