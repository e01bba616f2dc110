"""TOPIQ-FR (Chen et al., "TOPIQ: A Top-down Approach from Semantics to Distortions for Image
Quality Assessment", TIP 2024), the full-reference quality score of the paper's Tables 2-6, in
plain torch.

pyiqa's implementation needs timm and torchvision, and torchvision has no wheel for the torch this
project pins. This module rebuilds pyiqa's ``CFANet`` for ``topiq_fr`` (ResNet-50 backbone, a
reference image, 256-wide attention, 4 heads, one layer per block) with its parameter names, so
pyiqa's released weights load unchanged once converted to safetensors:

    freezeasguard convert-weights cfanet_fr_kadid_res50-2c4cc61d.pth topiq-fr.safetensors

(the checkpoint's ``params`` dict is unwrapped). Inputs are RGB in [0, 1], distorted and
reference images of one size; higher scores are better (KADID-trained: roughly 0..1).

The network, top-down: ResNet-50 features at five scales for both images; per scale the
distorted, reference and |difference| features are concatenated and gated by a small conv net of
the difference ("gated local pooling"), pooled to the coarsest grid, reduced to 256 channels,
given a learned position embedding and self-attention; then the coarsest tokens attend to each
finer scale in turn (cross-scale attention), and an attention layer plus an MLP pool the tokens to
one score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from freezeasguard.io import load_weights_strictly
from freezeasguard.metrics.basic import images_to_uint8

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- ResNet-50 trunk (timm / torchvision parameter names, no classifier) ----------------------
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # stride on the 3x3 conv (ResNet v1.5, as timm's and torchvision's resnet50)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Features(nn.Module):
    """timm's ``resnet50(features_only=True)``: the stem's activation and the four stages' outputs
    (64, 256, 512, 1024, 2048 channels at strides 2, 4, 8, 16, 32)."""
    channels = (64, 256, 512, 1024, 2048)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_ch = 64
        for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(in_ch, width, stride if b == 0 else 1))
                in_ch = width * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layer))

    def forward(self, x) -> list[torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = F.max_pool2d(x, 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats


# ---- attention blocks (pyiqa's pre-norm layers; names kept for its checkpoints) --------------
class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.linear1, self.linear2 = nn.Linear(dim, ff), nn.Linear(ff, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, src):                      # (tokens, batch, dim)
        h = self.norm1(src)
        src = src + self.self_attn(h, h, h, need_weights=False)[0]
        return src + self.linear2(F.gelu(self.linear1(self.norm2(src))))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        # pyiqa's layer owns a self-attention it never calls; it is kept so checkpoints load strictly
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.multihead_attn = nn.MultiheadAttention(dim, heads)
        self.linear1, self.linear2 = nn.Linear(dim, ff), nn.Linear(ff, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, tgt, memory):
        memory = self.norm2(memory)
        tgt = tgt + self.multihead_attn(self.norm1(tgt), memory, memory, need_weights=False)[0]
        return tgt + self.linear2(F.gelu(self.linear1(self.norm3(tgt))))


class Stack(nn.Module):
    """One layer in a ``layers`` list (pyiqa's TransformerEncoder/Decoder with num_layers=1)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([layer])

    def forward(self, *args):
        return self.layers[0](*args)


class TopiqFR(nn.Module):
    """pyiqa's CFANet(semantic_model_name='resnet50', use_ref=True) in eval mode."""

    def __init__(self, inter_dim: int = 256, heads: int = 4):
        super().__init__()
        self.semantic_model = ResNet50Features()
        ff = min(4 * inter_dim, 2048)
        chans = ResNet50Features.channels
        self.weight_pool = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, 64, 1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
                          nn.Conv2d(64, 1, 3, padding=1), nn.Sigmoid()) for c in chans)
        self.dim_reduce = nn.ModuleList(nn.Sequential(nn.Conv2d(3 * c, inter_dim, 1), nn.GELU()) for c in chans)
        self.sa_attn_blks = nn.ModuleList(Stack(EncoderLayer(inter_dim, heads, ff)) for _ in chans)
        self.attn_blks = nn.ModuleList(Stack(DecoderLayer(inter_dim, heads, ff)) for _ in chans[1:])
        self.attn_pool = EncoderLayer(inter_dim, heads, ff)
        self.score_linear = nn.Sequential(nn.LayerNorm(inter_dim), nn.Linear(inter_dim, inter_dim), nn.GELU(),
                                          nn.LayerNorm(inter_dim), nn.Linear(inter_dim, inter_dim), nn.GELU(),
                                          nn.Linear(inter_dim, 1))
        self.h_emb = nn.Parameter(torch.zeros(1, inter_dim // 2, 32, 1))
        self.w_emb = nn.Parameter(torch.zeros(1, inter_dim // 2, 1, 32))
        nn.init.trunc_normal_(self.h_emb, std=0.02)
        nn.init.trunc_normal_(self.w_emb, std=0.02)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @torch.no_grad()
    def forward(self, distorted: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B,) scores."""
        if distorted.shape != reference.shape:
            raise ValueError(f"distorted {tuple(distorted.shape)} and reference {tuple(reference.shape)} differ in shape")
        dist = self.semantic_model((distorted - self.mean) / self.std)
        ref = self.semantic_model((reference - self.mean) / self.std)
        th, tw = dist[-1].shape[2:]
        pos = torch.cat((self.h_emb.expand(-1, -1, -1, self.w_emb.shape[3]),
                         self.w_emb.expand(-1, -1, self.h_emb.shape[2], -1)), dim=1)
        tokens = []
        for i in reversed(range(len(dist))):           # coarse to fine
            diff = torch.sqrt((dist[i] - ref[i]) ** 2 + 1e-12)
            feat = torch.cat([dist[i], ref[i], diff], dim=1) * self.weight_pool[i](diff)
            if feat.shape[2] > th and feat.shape[3] > tw:
                feat = F.adaptive_avg_pool2d(feat, (th, tw))
            pe = F.interpolate(pos, size=feat.shape[2:], mode="bicubic", align_corners=False)
            feat = self.dim_reduce[i](feat).flatten(2).permute(2, 0, 1) + pe.flatten(2).permute(2, 0, 1)
            tokens.append(self.sa_attn_blks[i](feat))
        query = tokens[0]
        for i, block in enumerate(self.attn_blks):
            query = block(query, tokens[i + 1])
        return self.score_linear(self.attn_pool(query).mean(dim=0))[:, 0]


def load_topiq_fr(path, device: str = "cpu", flag: str = "--topiq-fr-weights") -> TopiqFR:
    """TOPIQ-FR from a local .safetensors file (pyiqa's cfanet_fr_*_res50 weights, converted);
    every parameter must be there with its shape."""

    model = load_weights_strictly(
        TopiqFR(), path, flag, "TOPIQ-FR (ResNet-50) weights",
        "Convert pyiqa's TOPIQ-FR weights (cfanet_fr_kadid_res50-2c4cc61d.pth, downloaded beforehand) with "
        "`freezeasguard convert-weights IN.pth OUT.safetensors`.")
    return model.to(device).eval()


@torch.no_grad()
def topiq_fr_scores(generated, references, model: TopiqFR, batch_size: int = 8) -> list[float]:
    """Per-image TOPIQ-FR of generated image k against reference k (resized to its size)."""

    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated images but {len(references)} references")
    size = generated[0].size
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(generated), batch_size):
        g = images_to_uint8([im.resize(size) for im in generated[s:s + batch_size]]).float().div(255).to(device)
        r = images_to_uint8([im.resize(size) for im in references[s:s + batch_size]]).float().div(255).to(device)
        out += model(g, r).tolist()
    return out
