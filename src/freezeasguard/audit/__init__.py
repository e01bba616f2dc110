"""Auditing what comes back: checkpoints (verify), adapters (adapters), the layouts people share
mapped to the denoiser's names (layouts), streaming reads (tensorfile), the mask's digests
(digests), and a hub's batch audit (batch)."""
