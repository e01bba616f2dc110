"""The shared diffusion loss against diffusers' DDPMScheduler."""
import torch

from freezeasguard.training.diffusion import NoiseSchedule, add_noise, diffusion_loss, min_snr_weights, velocity
from freezeasguard.models.families.tiny import scheduler_config


def test_targets_match_ddpm_scheduler():
    from diffusers import DDPMScheduler
    ddpm = DDPMScheduler.from_config(scheduler_config("v_prediction"))
    sched = NoiseSchedule.from_scheduler_config(scheduler_config("v_prediction"))
    torch.manual_seed(0)
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    torch.testing.assert_close(add_noise(x0, eps, t, sched.alphas_cumprod), ddpm.add_noise(x0, eps, t))
    torch.testing.assert_close(velocity(x0, eps, t, sched.alphas_cumprod), ddpm.get_velocity(x0, eps, t))


class _Oracle(torch.nn.Module):
    """Predicts a fixed tensor: the loss is the MSE between it and the target."""
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, noisy, t, encoder_hidden_states):
        return type("O", (), {"sample": self.out})()


def test_loss_is_zero_for_the_right_target_and_per_sample():
    torch.manual_seed(1)
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    text = torch.zeros(2, 77, 32)
    for pred in ("epsilon", "v_prediction"):
        s = NoiseSchedule.from_scheduler_config(scheduler_config(pred))
        target = eps if pred == "epsilon" else velocity(x0, eps, t, s.alphas_cumprod)
        assert diffusion_loss(_Oracle(target), x0, text, eps, t, s).abs().max() < 1e-10
        wrong = target.clone()
        wrong[1] += 1.0
        loss = diffusion_loss(_Oracle(wrong), x0, text, eps, t, s)
        torch.testing.assert_close(loss, torch.tensor([0.0, 1.0]))


def test_pndm_config_is_read_with_ddpm_semantics():
    s = NoiseSchedule.from_scheduler_config({"_class_name": "PNDMScheduler", **scheduler_config("epsilon")})
    assert s.num_train_timesteps == 1000 and s.prediction_type == "epsilon"
    assert 0 < float(s.alphas_cumprod[-1]) < float(s.alphas_cumprod[0]) < 1


def test_min_snr_weights_by_hand():
    for prediction in ("epsilon", "v_prediction"):
        schedule = NoiseSchedule.from_scheduler_config(scheduler_config(prediction))
        t = torch.tensor([0, 100, 500, 999])
        w = min_snr_weights(t, schedule, gamma=5.0)
        for ti, wi in zip(t.tolist(), w.tolist()):
            a = float(schedule.alphas_cumprod[ti])
            snr = a / (1 - a)
            expected = min(snr, 5.0) / (snr if prediction == "epsilon" else snr + 1)
            assert abs(wi - expected) < 1e-6
        if prediction == "epsilon":
            # clean steps (SNR far above 5) are down-weighted; the noisiest keep weight 1
            assert w[0] < 0.01 and w[-1] == 1.0


def test_min_snr_floor_adds_x0_weight_at_every_noise_level():
    """With a floor, the weight an x0 error gets (an epsilon loss is SNR times the x0 error, a v
    loss SNR + 1 times) is min(SNR, gamma) + floor: at t = 950 that is ~1 instead of ~0.008."""
    for prediction in ("epsilon", "v_prediction"):
        schedule = NoiseSchedule.from_scheduler_config(scheduler_config(prediction))
        t = torch.tensor([0, 500, 950, 999])
        w = min_snr_weights(t, schedule, gamma=5.0, floor=1.0)
        for ti, wi in zip(t.tolist(), w.tolist()):
            a = float(schedule.alphas_cumprod[ti])
            snr = a / (1 - a)
            on_x0 = wi * (snr if prediction == "epsilon" else snr + 1)
            assert abs(on_x0 - (min(snr, 5.0) + 1.0)) < 1e-4 * on_x0
    eps = NoiseSchedule.from_scheduler_config(scheduler_config("epsilon"))
    plain, floored = (min_snr_weights(torch.tensor([950]), eps, 5.0, f) for f in (0.0, 1.0))
    assert floored / plain > 100          # the noisiest steps count >100x more
