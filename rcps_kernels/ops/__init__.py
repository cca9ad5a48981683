"""Fused kernels registered as torch ops (torch.library custom ops with fake implementations)."""
