"""Generation seeds: every image starts from its own noise, independent of the batch it is in."""
import numpy as np

from freezeasguard.generate import generate_images, load_pipeline


def test_each_image_has_its_own_noise_and_batches_do_not_matter(tiny_sd):
    pipe = load_pipeline(tiny_sd)
    a, b = generate_images(pipe, ["a photo of a person", "a photo of a person"], steps=2, seed=5)
    # the same prompt twice must give two samples, not one image twice (an evaluation that
    # scored 16 copies of one sample was the bug this guards against)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    (alone,) = generate_images(pipe, ["a photo of a person"], steps=2, seed=6)
    assert np.array_equal(np.asarray(alone), np.asarray(b))
