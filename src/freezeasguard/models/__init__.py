"""The models: loading a pipeline folder and its denoiser (pipelines), the families' conditioning,
latents and call (families), published training settings (presets), the memory plan (memplan),
and sampling (generate)."""
