"""Distillation: PHI-S feature standardization, the losses, and the training tasks (stage 1, stage 2, highres)."""
