"""Generation seeds: every image starts from its own noise, independent of the batch it is in."""
import numpy as np

from freezeasguard.models.generate import generate_images, load_pipeline


def test_each_image_has_its_own_noise_and_batches_do_not_matter(tiny_sd):
    pipe = load_pipeline(tiny_sd)
    a, b = generate_images(pipe, ["a photo of a person", "a photo of a person"], steps=2, seed=5)
    # the same prompt twice must give two samples, not one image twice (an evaluation that
    # scored 16 copies of one sample was the bug this guards against)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    (alone,) = generate_images(pipe, ["a photo of a person"], steps=2, seed=6)
    assert np.array_equal(np.asarray(alone), np.asarray(b))


def test_validation_images_sample_with_the_folders_own_scheduler(tiny_sd):
    """A folder whose scheduler rescales its betas to zero terminal SNR (DDIM, v-prediction) is
    sampled with that schedule; PNDM, which has no such option, would start from other noise
    levels. An SD folder with PNDM keeps PNDM."""
    from freezeasguard.models.generate import pipeline_from_components
    from freezeasguard.models.pipelines import load_model
    from freezeasguard.models.families.tiny import scheduler_config
    components = load_model(tiny_sd)
    assert type(pipeline_from_components(components).scheduler).__name__ == "PNDMScheduler"
    components.scheduler_config = {"_class_name": "DDIMScheduler", **scheduler_config("v_prediction"),
                                   "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    sampler = pipeline_from_components(components).scheduler
    assert type(sampler).__name__ == "DDIMScheduler" and float(sampler.alphas_cumprod[-1]) == 0.0
