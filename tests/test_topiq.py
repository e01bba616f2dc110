"""TOPIQ-FR in plain torch: the ResNet-50 trunk, the attention layers against torch's own, pyiqa's
parameter names, loading only safetensors, and the score command."""
import json

import pytest
import torch

from freezeasguard.metrics.nets.topiq import (
    DecoderLayer,
    EncoderLayer,
    ResNet50Features,
    TopiqFR,
    load_topiq_fr,
    topiq_fr_scores,
)


def test_resnet50_trunk_has_the_published_size_and_five_scales():
    trunk = ResNet50Features()
    # torchvision's resnet50 has 25,557,032 parameters; its 2048 x 1000 classifier has 2,049,000
    assert sum(p.numel() for p in trunk.parameters()) == 25_557_032 - 2_049_000
    feats = trunk(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]


def test_encoder_layer_is_torchs_pre_norm_gelu_transformer_layer():
    torch.manual_seed(0)
    ours = EncoderLayer(32, 4, 64).eval()
    ref = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", norm_first=True).eval()
    ref.load_state_dict(ours.state_dict())        # the same names: self_attn, linear1/2, norm1/2
    x = torch.randn(7, 3, 32)                     # (tokens, batch, dim)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_decoder_layer_ignores_its_unused_self_attention():
    """pyiqa's decoder layer owns a self-attention it never calls (kept only so its checkpoints
    load strictly): changing it must not change the output, changing the cross-attention must."""
    torch.manual_seed(0)
    layer = DecoderLayer(32, 4, 64).eval()
    q, mem = torch.randn(4, 2, 32), torch.randn(9, 2, 32)
    before = layer(q, mem)
    with torch.no_grad():
        layer.self_attn.in_proj_weight.add_(torch.randn_like(layer.self_attn.in_proj_weight))
    torch.testing.assert_close(layer(q, mem), before)
    with torch.no_grad():
        # random, not constant: a constant shift is invisible after LayerNorm's zero-mean output
        layer.multihead_attn.in_proj_weight.add_(0.1 * torch.randn_like(layer.multihead_attn.in_proj_weight))
    assert not torch.allclose(layer(q, mem), before)


def test_parameter_names_are_pyiqas_cfanet_names():
    """Names read off pyiqa's CFANet (topiq_arch.py) with a timm resnet50 features_only trunk."""
    names = set(TopiqFR().state_dict())
    for name in ["semantic_model.conv1.weight", "semantic_model.bn1.running_mean",
                 "semantic_model.layer1.0.downsample.0.weight", "semantic_model.layer4.2.bn3.weight",
                 "weight_pool.0.0.weight", "weight_pool.4.4.bias", "dim_reduce.4.0.weight",
                 "sa_attn_blks.0.layers.0.self_attn.in_proj_weight", "sa_attn_blks.4.layers.0.norm2.bias",
                 "attn_blks.3.layers.0.multihead_attn.out_proj.weight", "attn_blks.0.layers.0.self_attn.in_proj_bias",
                 "attn_blks.0.layers.0.norm3.weight", "attn_pool.linear1.weight", "score_linear.0.weight",
                 "score_linear.4.bias", "score_linear.6.weight", "h_emb", "w_emb"]:
        assert name in names, name
    assert not any(n.startswith(("mean", "std")) for n in names)     # normalisation constants are not weights
    model = TopiqFR()
    assert model.dim_reduce[0][0].in_channels == 3 * 64 and model.dim_reduce[4][0].in_channels == 3 * 2048
    assert model.h_emb.shape == (1, 128, 32, 1) and model.score_linear[6].out_features == 1


def _random_images(n, seed, size=64):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def test_scores_do_not_depend_on_the_batch_and_weights_round_trip(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = TopiqFR()
    gen, ref = _random_images(3, 0), _random_images(3, 1)
    together = topiq_fr_scores(gen, ref, model, batch_size=3)
    alone = [topiq_fr_scores([g], [r], model)[0] for g, r in zip(gen, ref)]
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 6) for s in together)) == 3          # the score depends on the pair
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, tmp_path / "topiq.safetensors")
    loaded = load_topiq_fr(tmp_path / "topiq.safetensors")
    assert topiq_fr_scores(gen, ref, loaded) == pytest.approx(together, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 32, 32))


def test_loading_refuses_missing_files_pickles_and_foreign_weights(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(FileNotFoundError, match="--topiq-fr-weights"):
        load_topiq_fr(tmp_path / "nothing.safetensors")
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_topiq_fr(tmp_path / "w.pth")
    save_file({"conv.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not TOPIQ-FR"):
        load_topiq_fr(tmp_path / "other.safetensors")


def test_pyiqa_checkpoint_converts_and_scores_from_the_command_line(tmp_path, capsys):
    """A checkpoint laid out as pyiqa's ({"params": state dict}) converts with convert-weights;
    `score --topiq-fr-weights` then gives the mean of topiq_fr_scores over (generated k, real k)."""
    from freezeasguard.cli import main
    torch.manual_seed(1)
    model = TopiqFR()
    torch.save({"params": model.state_dict()}, tmp_path / "cfanet_fr_kadid_res50.pth")
    assert main(["convert-weights", str(tmp_path / "cfanet_fr_kadid_res50.pth"), str(tmp_path / "t.safetensors")]) == 0
    gen, real = tmp_path / "gen", tmp_path / "real"
    gen.mkdir(), real.mkdir()
    g_imgs, r_imgs = _random_images(4, 2), _random_images(4, 3)
    for i, (g, r) in enumerate(zip(g_imgs, r_imgs)):
        g.save(gen / f"{i}.png")
        r.save(real / f"{i}.png")
    capsys.readouterr()
    assert main(["score", str(gen), "--real", str(real), "--topiq-fr-weights", str(tmp_path / "t.safetensors")]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = sum(topiq_fr_scores(g_imgs, r_imgs, model)) / 4
    assert out["topiq_fr"] == pytest.approx(expected, abs=1e-5)
    assert main(["score", str(gen), "--topiq-fr-weights", str(tmp_path / "t.safetensors")]) == 2
    assert "pass --real DIR" in capsys.readouterr().err
