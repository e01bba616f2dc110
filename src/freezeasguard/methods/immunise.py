"""immunise: the immunised release (guard/immunise.py) as a link of a chain: `learned+immunise`,
`learned-identity+immunise`, `saliency+immunise`. It takes the earlier link's mask, optimises the
values of the tensors that mask freezes against simulated attackers, and returns the release (a
model folder) with the same frozen set, now fingerprinted as the release: the base itself no longer
matches it, and every guarded fine-tune and audit of the release keeps the immunised values."""
from __future__ import annotations

import dataclasses

from freezeasguard.guard.immunise import immunise
from freezeasguard.io import atomic_write_json
from freezeasguard.models.pipelines import fingerprint
from freezeasguard.methods.registry import MethodInputs, Protection, data_mix, draw_seed, load_base, register
from freezeasguard.training.train import save_pipeline


@register("immunise", uses_ratio=False, needs_mask=True,
          summary="the frozen tensors' values optimised so that attackers fine-tuning the rest stay far from the "
                  "identity (after a freezing method: learned+immunise)")
def immunise_release(inputs: MethodInputs) -> Protection:
    s, mask = inputs.settings, inputs.mask
    if mask is None:
        raise ValueError("immunise needs the mask of a freezing method that chooses one (learned, learned-identity, "
                         "saliency, largest); random draws a new mask per fine-tune and cannot be immunised")
    comps, schedule, device = load_base(inputs)
    mask.check_matches(list(comps.denoiser.named_parameters()))
    comps.denoiser.train()
    illegal = data_mix([inputs.illegal], comps, schedule, s.immunise_batch, draw_seed(s, 0), device, s.identity_class)
    innocent = (data_mix(inputs.innocent, comps, schedule, s.immunise_batch, draw_seed(s, 1), device,
                         s.innocent_identity_class) if inputs.innocent else None)
    history = immunise(comps.denoiser, set(mask.frozen_names), lambda: illegal.draw(device),
                       (lambda: innocent.draw(device)) if innocent else None, schedule, s, seed=s.protection_seed)
    out = inputs.work_dir / f"release-{inputs.ratio:g}"
    atomic_write_json(inputs.work_dir / f"immunise-{inputs.ratio:g}-history.json", history)
    denoiser = comps.denoiser.cpu()
    save_pipeline(inputs.model, denoiser, out,
                  {"scheme": "immunised release", "frozen_tensors": len(mask.frozen_names),
                   "mask_method": mask.meta.get("method"),
                   "settings": {k: v for k, v in dataclasses.asdict(s).items() if k.startswith("immunise_")},
                   "final": history[-1] if history else None}, command="protect")
    release_mask = dataclasses.replace(mask, base_fingerprint=fingerprint(list(denoiser.named_parameters())),
                                       meta={**mask.meta, "immunised": True, "release": str(out)})
    return Protection(model=out, mask=release_mask)
