"""The plain-torch FID Inception-v3: its size against torchvision's published count, weight loading
from safetensors (and refusals), TensorFlow's padding-free average pool, the safe .pth converter,
and FID through torchmetrics with it."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from freezeasguard.io import convert_to_safetensors
from freezeasguard.metrics.nets.inception import FIDInceptionV3, _tf_avg_pool, load_fid_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    path = tmp_path_factory.mktemp("inception") / "fid-inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_parameter_count_matches_torchvision_inception_without_aux_head_and_with_1008_classes():
    # torchvision documents inception_v3 (aux head, 1000 classes) as 27,161,264 parameters
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    expected = 27_161_264 - aux - (2048 * 1000 + 1000) + (2048 * 1008 + 1008)
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == expected == 23_850_960


def test_tensorflow_average_pool_ignores_padding():
    ones = torch.ones(1, 1, 5, 5)
    assert torch.equal(_tf_avg_pool(ones), ones)       # count_include_pad=True gives 4/9 in the corners


def test_loaded_weights_give_the_same_2048_features(weights):
    model, path = weights
    loaded = load_fid_inception(path)
    images = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = model(images), loaded(images)
    assert a.shape == (3, 2048) and a.dtype == torch.float64
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])              # the features see the image


def test_refuses_missing_pickled_and_foreign_weights(tmp_path, weights):
    with pytest.raises(FileNotFoundError, match="--fid-inception-weights"):
        load_fid_inception(tmp_path / "nope.safetensors")
    pth = tmp_path / "w.pth"
    pth.write_bytes(b"x")
    with pytest.raises(ValueError, match="convert-weights"):
        load_fid_inception(pth)
    _, path = weights
    from safetensors.torch import load_file
    state = load_file(str(path))
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["fc.weight"] = torch.zeros(1000, 2048)
    foreign = tmp_path / "foreign.safetensors"
    save_file(state, str(foreign))
    with pytest.raises(ValueError, match="1 missing keys.*Mixed_7c.branch_pool.conv.weight.*1 of the wrong shape"):
        load_fid_inception(foreign)


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/freezeasguard-test-pwned", "w"))


def test_convert_weights_copies_tensors_and_never_runs_code(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5.0)}
    torch.save({"state_dict": state}, tmp_path / "ok.pth")
    assert convert_to_safetensors(tmp_path / "ok.pth", tmp_path / "ok.safetensors") == 2
    from safetensors.torch import load_file
    back = load_file(str(tmp_path / "ok.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in state.items())

    marker = __import__("pathlib").Path("/tmp/freezeasguard-test-pwned")
    marker.unlink(missing_ok=True)
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"w": _Exploit()}))
    with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
        convert_to_safetensors(tmp_path / "evil.pth", tmp_path / "evil.safetensors")
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()


@pytest.mark.slow
def test_fid_with_the_inception_is_zero_on_the_same_set_and_positive_on_another(weights):
    pytest.importorskip("torchmetrics")
    from freezeasguard.metrics.real import fid_and_kid
    model, _ = weights
    g = torch.Generator().manual_seed(2)
    real = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    other = (real.float() * 0.3).to(torch.uint8)
    same, diff = fid_and_kid(real, real, model, kid_subset=6), fid_and_kid(real, other, model, kid_subset=6)
    assert abs(same["fid"]) < 1e-2 * diff["fid"] and diff["fid"] > 0
