"""Networks re-implemented in plain torch with their reference parameter names (no torchvision)."""
