"""Metrics: judged ones that need no downloaded weights (basic), real-model ones over weights on
disk (real: FID/KID, CLIP score; faces; nets/: the FID Inception-v3 and TOPIQ-FR networks in plain
torch) and scoring a folder of generated images (score)."""
from freezeasguard.metrics.basic import attribute_accuracy, frechet_distance, identity_recognition, prompt_accuracy  # noqa: F401
