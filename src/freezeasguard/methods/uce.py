"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), written from the paper's equations.

Each cross-attention key and value projection W (attn2.to_k, attn2.to_v) is replaced by the
minimiser of

    sum_{c in E} eta_e |W c - W_old g(c)|^2 + sum_{c in P} eta_p |W c - W_old c|^2 + lambda |W - W_old|_F^2

(E: token embeddings of the erased concepts, g(c): the guide concept's embedding at the aligned
position, P: embeddings of preserved concepts), whose closed form is

    W = (eta_e sum v* c^T + eta_p sum W_old c c^T + lambda W_old) (eta_e sum c c^T + eta_p sum c c^T + lambda I)^-1.

Which token embeddings enter (our reading; the paper leaves it to the implementation): the text
encoder's output from the prompt's last word to the end of the padded sequence. In a causal CLIP
encoder those positions are the ones that have seen the whole name, and they make up most of
what cross-attention reads. Concept and guide are aligned at their last words.
"""
from __future__ import annotations

import logging
import re

import torch

from freezeasguard.training.data import load_image_captions
from freezeasguard.training.train import save_pipeline
from freezeasguard.methods.registry import MethodInputs, Protection, load_base, register

logger = logging.getLogger(__name__)

TARGETS = r"attn2\.to_[kv]$"


def uce_closed_form(weight: torch.Tensor, erase_inputs: torch.Tensor, erase_targets: torch.Tensor,
                    preserve_inputs: torch.Tensor | None, erase_scale: float = 1.0, preserve_scale: float = 1.0,
                    lam: float = 0.5) -> torch.Tensor:
    """The edited weight (out, in). erase_inputs (n_e, in), erase_targets (n_e, out) = the outputs
    the erased tokens should get, preserve_inputs (n_p, in). Solved in float64."""
    w = weight.double()
    e, t = erase_inputs.double(), erase_targets.double()
    a = lam * torch.eye(w.shape[1], dtype=torch.float64, device=w.device) + erase_scale * e.T @ e
    b = lam * w + erase_scale * t.T @ e
    if preserve_inputs is not None and len(preserve_inputs):
        p = preserve_inputs.double()
        a = a + preserve_scale * p.T @ p
        b = b + preserve_scale * (w @ p.T) @ p
    # W a = b with a symmetric positive definite
    return torch.linalg.solve(a, b.T).T.to(weight.dtype)


def uce_objective(weight, old_weight, erase_inputs, erase_targets, preserve_inputs, erase_scale, preserve_scale, lam):
    """The objective the closed form minimises (for tests and diagnostics)."""
    value = erase_scale * ((erase_inputs @ weight.T - erase_targets) ** 2).sum() + lam * ((weight - old_weight) ** 2).sum()
    if preserve_inputs is not None and len(preserve_inputs):
        value = value + preserve_scale * ((preserve_inputs @ (weight - old_weight).T) ** 2).sum()
    return value


@torch.no_grad()
def encode_prompts(components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder outputs (n, L, dim) and the index of each prompt's last word (n,)."""
    tok = components.tokenizer(prompts, padding="max_length", max_length=components.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
    device = next(components.text_encoder.parameters()).device
    emb = components.text_encoder(tok.input_ids.to(device))[0].float()
    last = tok.attention_mask.sum(1) - 2         # BOS, words..., EOS: the last word's position
    return emb, last.clamp(min=1)


def aligned_tokens(emb_a, last_a: int, emb_b, last_b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions from each prompt's last word to the end, aligned at the last words (same length)."""
    length = emb_a.shape[0]
    far = max(last_a, last_b)
    return emb_a[last_a:length - (far - last_a)], emb_b[last_b:length - (far - last_b)]


def concept_embeddings(components, erase: list[str], guide: str, preserve: list[str]):
    """(erase inputs, guide inputs aligned to them, preserve inputs), each (n_tokens, dim)."""
    emb, last = encode_prompts(components, erase + [guide] + preserve)
    n = len(erase)
    pairs = [aligned_tokens(emb[i], int(last[i]), emb[n], int(last[n])) for i in range(n)]
    erase_in = torch.cat([p[0] for p in pairs])
    guide_in = torch.cat([p[1] for p in pairs])
    keep = [aligned_tokens(emb[n + 1 + j], int(last[n + 1 + j]), emb[n + 1 + j], int(last[n + 1 + j]))[0]
            for j in range(len(preserve))]
    return erase_in, guide_in, torch.cat(keep) if keep else None


@torch.no_grad()
def apply_uce(components, erase: list[str], guide: str, preserve: list[str], erase_scale: float = 1.0,
              preserve_scale: float = 1.0, lam: float = 0.5, targets: str = TARGETS) -> list[str]:
    """Edit the UNet in place; returns the names of the edited modules."""
    if not erase:
        raise ValueError("UCE needs at least one concept to erase (the illegal subjects' names)")
    erase_in, guide_in, preserve_in = concept_embeddings(components, erase, guide, preserve)
    pattern = re.compile(targets)
    edited = []
    for name, module in components.denoiser.named_modules():
        if pattern.search(name) and isinstance(module, torch.nn.Linear):
            w = module.weight
            dev = w.device
            guide_out = guide_in.to(dev).double() @ w.double().T      # what the guide gets from W_old
            keep = None if preserve_in is None else preserve_in.to(dev)
            module.weight.copy_(uce_closed_form(w, erase_in.to(dev), guide_out, keep, erase_scale, preserve_scale, lam))
            edited.append(name)
    if not edited:
        raise ValueError(f"no UNet module matches {targets!r}: is this a Stable Diffusion UNet with cross-attention?")
    logger.info("UCE: edited %d projections (%d erase tokens -> %r, %d preserve tokens)", len(edited), len(erase_in),
                guide, 0 if preserve_in is None else len(preserve_in))
    return edited


def preserve_prompts(innocent_dirs, limit: int) -> list[str]:
    """The first ``limit`` distinct captions of the innocent data."""
    out: list[str] = []
    for d in innocent_dirs:
        for c in load_image_captions(d, check_images=False).captions:
            if c not in out:
                out.append(c)
    return out[:limit]


@register("uce", uses_ratio=False, summary="UCE: cross-attention K/V edited to map the subjects' names to a guide")
def uce(inputs: MethodInputs) -> Protection:
    s = inputs.settings
    out = inputs.work_dir / "model"
    comps, _, _ = load_base(inputs)
    preserve = preserve_prompts(inputs.innocent, s.uce_preserve_prompts)
    edited = apply_uce(comps, list(inputs.subjects), s.uce_guide, preserve, s.uce_erase_scale, s.uce_preserve_scale,
                       s.uce_lambda)
    save_pipeline(inputs.model, comps.denoiser.cpu(), out,
                  {"scheme": "uce", "erased": list(inputs.subjects), "guide": s.uce_guide,
                   "preserved_prompts": len(preserve), "edited_modules": len(edited),
                   "erase_scale": s.uce_erase_scale, "preserve_scale": s.uce_preserve_scale, "lambda": s.uce_lambda})
    return Protection(model=out)
