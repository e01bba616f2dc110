"""Face identity of generated portraits, with dlib's models (the ``faces`` extra).

``pip install "freezeasguard[faces]"`` installs dlib-bin (a prebuilt dlib wheel) and
face-recognition-models (which carries dlib's face detector, 5-point landmark model and 128-d
face recognition network), so nothing is downloaded at run time.

identity_match: the share of generated images with a detected face whose descriptor lies within
``threshold`` (dlib's customary 0.6, Euclidean) of the mean descriptor of the target person's
real photos; images with no detected face count as not matching, and their share is reported
as detection_failure.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

DLIB_THRESHOLD = 0.6


class FaceEmbedder:
    def __init__(self):
        spec = importlib.util.find_spec("face_recognition_models")
        try:
            import dlib
        except ImportError:
            spec = None
        if spec is None:
            raise ImportError('face identity needs the faces extra: pip install "freezeasguard[faces]" '
                              '(dlib-bin and face-recognition-models, which carry the weights)')
        # read the model files from the package folder: importing the package needs pkg_resources,
        # which setuptools >= 81 no longer has
        models = Path(next(iter(spec.submodule_search_locations))) / "models"
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def describe(self, image) -> np.ndarray | None:
        """128-d descriptor of the largest detected face, or None when no face is found."""
        arr = np.asarray(image.convert("RGB"))
        faces = self.detector(arr, 1)
        if not faces:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        return np.asarray(self.encoder.compute_face_descriptor(arr, self.landmarks(arr, face)))


def face_identity(generated, reference, embedder: FaceEmbedder | None = None,
                  threshold: float = DLIB_THRESHOLD) -> dict:
    embedder = embedder or FaceEmbedder()
    refs = [d for d in (embedder.describe(im) for im in reference) if d is not None]
    if not refs:
        raise ValueError("no face found in any reference photo of the target person")
    centre = np.mean(refs, axis=0)
    descs = [embedder.describe(im) for im in generated]
    matches = [d is not None and float(np.linalg.norm(d - centre)) < threshold for d in descs]
    return {"identity_match": sum(matches) / len(descs),
            "detection_failure": sum(d is None for d in descs) / len(descs),
            "reference_faces": len(refs)}
