"""The SAE trained with decoding by gathered rows equals sae-lens's own TopK training, loss for loss."""

from __future__ import annotations

import pytest
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig

from competency_gaps import sae_topk
from competency_gaps.sae_topk import (
    FusedAdamTrainer,
    GatheredTopKTrainingSAE,
    deterministic_on_cpu,
    trainer_class,
    training_sae_class,
)

D_IN, D_SAE, K = 24, 96, 6


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def twin_saes(rescale: bool, device: str = "cpu") -> tuple[TopKTrainingSAE, GatheredTopKTrainingSAE]:
    """sae-lens's SAE and ours with the same, non-trivial weights (a decoder of uneven row norms, a bias)."""
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale, device=device)
    torch.manual_seed(0)
    reference = TopKTrainingSAE(cfg)
    with torch.no_grad():
        reference.W_dec.mul_(torch.rand(D_SAE, 1).to(device) * 3 + 0.2)
        reference.W_enc.normal_(0, 0.3)
        reference.b_dec.normal_()
        reference.b_enc.normal_(0, 0.1)
    gathered = GatheredTopKTrainingSAE(cfg)
    gathered.load_state_dict(reference.state_dict())
    return reference, gathered


def one_step(sae: TopKTrainingSAE, x: torch.Tensor, dead: torch.Tensor | None) -> tuple[dict[str, float], torch.Tensor, dict[str, torch.Tensor]]:
    sae.zero_grad()
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0,
                                                   is_logging_step=False))
    out.loss.backward()
    losses = {name: value.item() for name, value in out.losses.items()}
    return losses, out.sae_out.detach(), {name: p.grad.clone() for name, p in sae.named_parameters()}


def dead_mask(n_dead: int, device: str) -> torch.Tensor | None:
    if n_dead == 0:
        return None
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    return mask.to(device)


# no dead latents; fewer dead than the auxiliary k (d_in / 2 = 12: every dead latent decodes); more than it
@pytest.mark.parametrize("n_dead", [0, 5, 40])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_losses_and_gradients_equal_sae_lens(rescale: bool, n_dead: int, device: str):
    reference, gathered = twin_saes(rescale, device)
    x = (torch.randn(50, D_IN, generator=torch.Generator().manual_seed(2)) * 2 + 1).to(device)
    dead = dead_mask(n_dead, device)
    want_losses, want_out, want_grads = one_step(reference, x, dead)
    got_losses, got_out, got_grads = one_step(gathered, x, dead)
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    assert (got_losses["auxiliary_reconstruction_loss"] > 0) == (n_dead > 0)
    torch.testing.assert_close(got_out, want_out)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_the_trainer_statistics_see_the_same_firing_latents():
    reference, gathered = twin_saes(True)
    x = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(3))
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    want, got = reference.training_forward_pass(step).feature_acts, gathered.training_forward_pass(step).feature_acts
    torch.testing.assert_close(got, want.detach())
    assert not got.requires_grad  # the statistics' dense copy carries no gradient
    assert ((got > 0).sum(-1) <= K).all()


def test_saved_inference_sae_is_sae_lens_topk(tmp_path):
    from sae_lens import SAE

    _, gathered = twin_saes(True)
    gathered.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(str(tmp_path), device="cpu")
    assert loaded.cfg.architecture() == "topk"
    x = torch.randn(8, D_IN)
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    torch.testing.assert_close(loaded(x), gathered.training_forward_pass(step).sae_out.detach(), rtol=1e-4, atol=1e-5)


def test_deterministic_algorithms_only_while_training_on_cpu():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_on_cpu(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    with deterministic_on_cpu(torch.device("cuda")):
        assert torch.are_deterministic_algorithms_enabled() == before


def test_the_stage_trains_the_gathered_sae_on_cpu_and_cuda_only():
    assert training_sae_class(torch.device("cpu")) is GatheredTopKTrainingSAE
    assert training_sae_class(torch.device("cuda")) is GatheredTopKTrainingSAE
    assert training_sae_class(torch.device("mps")) is TopKTrainingSAE


def twin_trainers(steps: int) -> tuple[SAETrainer, FusedAdamTrainer]:
    """sae-lens's trainer and the fused one on SAEs with the same weights, with a warm-up, a cosine schedule and a
    linear decay."""
    cfg = SAETrainerConfig(total_training_samples=steps * 8, train_batch_size_samples=8, lr=3e-3, lr_end=3e-4,
                           lr_scheduler_name="cosineannealing", lr_warm_up_steps=5, lr_decay_steps=7, device="cpu",
                           adam_beta1=0.8, adam_beta2=0.99)
    reference, twin = twin_saes(rescale=True)
    plain = SAETrainer(cfg=cfg, sae=reference, data_provider=iter([]))
    fused = FusedAdamTrainer(cfg=cfg, sae=twin, data_provider=iter([]))
    return plain, fused


def test_the_fused_trainer_keeps_sae_lens_settings_schedule_and_update():
    steps = 40
    plain, fused = twin_trainers(steps)
    assert fused.optimizer.defaults["fused"] and not plain.optimizer.defaults.get("fused")
    settings = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
    assert {k: fused.optimizer.defaults[k] for k in settings} == {k: plain.optimizer.defaults[k] for k in settings}
    assert [p for group in fused.optimizer.param_groups for p in group["params"]] == list(fused.sae.parameters())
    x = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(1)) + 1
    rates = []
    for _ in range(steps):
        for trainer in (plain, fused):
            trainer.optimizer.zero_grad()
            trainer.sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                             n_training_steps=0, is_logging_step=False)).loss.backward()
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        rates.append((plain.optimizer.param_groups[0]["lr"], fused.optimizer.param_groups[0]["lr"]))
    assert [a for a, _ in rates] == [b for _, b in rates]  # warm-up, cosine and decay step for step
    assert len(set(a for a, _ in rates)) > 10
    for name, weights in plain.sae.state_dict().items():  # 40 Adam steps: the same weights to float rounding
        torch.testing.assert_close(fused.sae.state_dict()[name], weights, rtol=1e-4, atol=1e-5, msg=name)


def test_the_stage_steps_the_fused_adam_on_cpu_and_cuda_only(monkeypatch):
    assert trainer_class(torch.device("cpu")) is FusedAdamTrainer
    assert trainer_class(torch.device("cuda")) is FusedAdamTrainer
    assert trainer_class(torch.device("mps")) is SAETrainer
    from competency_gaps.sae import train_topk_sae

    made = []

    class Spy(FusedAdamTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.optimizer)

    monkeypatch.setattr(sae_topk, "FusedAdamTrainer", Spy)
    spec = {"d_sae": D_SAE, "k": K, "training_tokens": 640, "batch_size": 64, "lr": 3e-3, "seed": 0}
    train_topk_sae(torch.randn(1000, D_IN) + 2, spec, 2, "tiny-model", torch.device("cpu"))
    assert len(made) == 1 and made[0].defaults["fused"]


def test_train_topk_sae_trains_the_gathered_sae_deterministically():
    from competency_gaps.sae import train_topk_sae

    spec = {"d_sae": D_SAE, "k": K, "training_tokens": 6400, "batch_size": 64, "lr": 3e-3, "seed": 0}
    acts = torch.randn(3000, D_IN, generator=torch.Generator().manual_seed(4)) + 2
    first, second = (train_topk_sae(acts, spec, 2, "tiny-model", torch.device("cpu")) for _ in range(2))
    assert type(first) is GatheredTopKTrainingSAE
    for name, weights in first.state_dict().items():
        assert torch.equal(weights, second.state_dict()[name]), name
