"""freezeasguard: learn which denoiser tensors to freeze so that fine-tuning a diffusion model on
illegal domains stays weak while innocent domains adapt freely (FreezeAsGuard), enforce that
freezing in fine-tuning, and audit fine-tuned checkpoints.

    from freezeasguard import LearnConfig, learn_mask, FinetuneConfig, guarded_finetune, Mask, verify_checkpoint
"""
from freezeasguard.training.finetune import EnforcementError, FinetuneConfig, FinetuneResult, guarded_finetune
from freezeasguard.training.train import DivergedError, RunSettings
from freezeasguard.models.generate import generate_to_folder, load_pipeline
from freezeasguard.guard.learn import LearnConfig, LearnResult, learn_mask
from freezeasguard.guard.mask import Mask, MaskError, select_frozen
from freezeasguard.models.pipelines import load_model
from freezeasguard.models.families.tiny import build_tiny_pipeline, save_tiny_pipeline
from freezeasguard.audit.verify import VerifyReport, verify_checkpoint, verify_state
from freezeasguard.version import __version__

__all__ = [
    "__version__", "LearnConfig", "LearnResult", "learn_mask", "FinetuneConfig", "FinetuneResult",
    "guarded_finetune", "EnforcementError", "DivergedError", "Mask", "MaskError", "select_frozen", "verify_checkpoint",
    "verify_state", "VerifyReport", "generate_to_folder", "load_pipeline", "build_tiny_pipeline",
    "save_tiny_pipeline", "load_model",
]
