"""freezeasguard: learn which UNet tensors to freeze so that fine-tuning a diffusion model on
illegal domains stays weak while innocent domains adapt freely (FreezeAsGuard), enforce that
freezing in fine-tuning, and audit fine-tuned checkpoints.

    from freezeasguard import LearnConfig, learn_mask, FinetuneConfig, guarded_finetune, Mask, verify_checkpoint
"""
__version__ = "0.1.0"

from .finetune import EnforcementError, FinetuneConfig, FinetuneResult, guarded_finetune  # noqa: E402
from .generate import generate_to_folder, load_pipeline  # noqa: E402
from .learn import LearnConfig, LearnResult, learn_mask  # noqa: E402
from .mask import Mask, MaskError, select_frozen  # noqa: E402
from .models import build_tiny_pipeline, load_sd, save_tiny_pipeline  # noqa: E402
from .verify import VerifyReport, verify_checkpoint, verify_state  # noqa: E402

__all__ = [
    "__version__", "LearnConfig", "LearnResult", "learn_mask", "FinetuneConfig", "FinetuneResult",
    "guarded_finetune", "EnforcementError", "Mask", "MaskError", "select_frozen", "verify_checkpoint",
    "verify_state", "VerifyReport", "generate_to_folder", "load_pipeline", "build_tiny_pipeline",
    "save_tiny_pipeline", "load_sd",
]
