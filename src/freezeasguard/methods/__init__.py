"""Protection methods behind one registry: FreezeAsGuard and the baselines it is compared with.

A method turns (base model, illegal data, innocent data, settings) into a :class:`Protection`:
a modified base model, a mask to enforce in fine-tuning, a random freezing ratio, or nothing
(full fine-tuning). Methods chain with "+": in ``uce+learned`` the UCE-edited model is the base
on which the mask is learned, and the illegal user fine-tunes that edited model under the mask.

Adding a method is one small module that calls :func:`register`. Registered here:

=========  ===============================================================  ============
name       what it produces                                                 uses ratio
=========  ===============================================================  ============
full       nothing: every tensor trainable (the unprotected baseline)       no
random     a random mask of rho (drawn per fine-tuning seed)                yes
learned    FreezeAsGuard's learned mask (bilevel mask learning)             yes
saliency   a mask of the tensors with the largest illegal-loss gradients     yes
largest    a mask of the largest tensors (a data-free control: the size     yes
           bias of gradient-based rankings, and nothing else)
smallest   a mask of the smallest tensors (a data-free control: the most     yes
           tensors a parameter budget buys, every bias and norm first)
uce        a base model whose cross-attention maps the subjects' names       no
           onto a guide concept (closed-form edit, Gandikota et al. 2024)
imma       a base model whose cross-attention resists adaptation to the      no
           illegal data (bilevel immunisation, Zheng & Yeh 2024)
=========  ===============================================================  ============
"""
# importing the modules registers their methods
from freezeasguard.methods import basic, imma, immunise, saliency, uce  # noqa: E402,F401
from freezeasguard.methods.registry import (  # noqa: F401
                       METHODS,
                       Method,
                       MethodInputs,
                       Protection,
                       ProtectSettings,
                       chain_uses_ratio,
                       data_mix,
                       method_label,
                       parse_chain,
                       protect,
                       register,
)
