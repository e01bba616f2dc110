"""Face identity with dlib's models (the faces extra), on the real face photo inside scikit-image."""
import pytest

dlib = pytest.importorskip("dlib", reason="the faces extra (dlib-bin) is not installed")
if __import__("importlib.util").util.find_spec("face_recognition_models") is None:
    pytest.skip("the faces extra (face-recognition-models) is not installed", allow_module_level=True)
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (for its astronaut photo) is not installed")

from PIL import Image, ImageOps  # noqa: E402

from freezeasguard.metrics.faces import FaceEmbedder, face_identity  # noqa: E402


def test_same_person_matches_and_blank_images_fail_detection():
    astronaut = Image.fromarray(skimage_data.astronaut())
    embedder = FaceEmbedder()
    variants = [astronaut, ImageOps.mirror(astronaut), astronaut.resize((384, 384)),
                astronaut.rotate(5, fillcolor=(128, 128, 128))]
    blank = Image.new("RGB", (256, 256), (120, 120, 120))
    result = face_identity(variants + [blank], [astronaut], embedder)
    assert result["reference_faces"] == 1
    assert result["detection_failure"] == pytest.approx(1 / 5)
    assert result["identity_match"] == pytest.approx(4 / 5)
    # a strict threshold rejects the slightly different views: the match is a real distance test
    strict = face_identity(variants[1:], [astronaut], embedder, threshold=1e-6)
    assert strict["identity_match"] == 0.0
    with pytest.raises(ValueError, match="no face found"):
        face_identity(variants, [blank], embedder)
