"""cnn adversarial: FGSM and PGD against a small trained model (they break it, PGD at least as hard,
restarts never weaker, within the eps ball and the pixel box, also under bf16 autocast), free
adversarial training's persistent perturbation, the `adversarial` config keys, and the shared loop
end to end in each training mode with val/robust_acc, where adversarial training beats plain training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SMOKE_CNN, accelerate_launch, read_metrics, reset_accelerate_state
from test_cnn_data import accept_written_cifar, gratings, write_cifar
from cnn.adversarial import FreePerturbation, RobustOutputs, fgsm, pgd
from cnn.models import create_model
from harness.config import load_config
from harness.errors import ConfigError
from harness.loop import train
from harness.task import get_task


pytestmark = pytest.mark.usefixtures("one_thread")

# In pixels of [0, 1]. The generated gratings carry noise of std 0.3, so a trained model shrugs off
# the CIFAR budget of 8/255; at 0.1 a plainly trained one loses most of its accuracy.
EPS = 0.1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny CIFAR-10 (grating classes 0-3) written as torchvision's python pickles and read back through
    torchvision's CIFAR10 class, as data.source=cifar10 reads it: float pixels in [0, 1]."""
    root = tmp_path_factory.mktemp("cifar")
    with pytest.MonkeyPatch.context() as patch:
        md5 = write_cifar(root, "cifar10", gratings(256, 32, 3, seed=1), gratings(100, 32, 3, seed=2))
        accept_written_cifar(patch, "cifar10", md5)
        cfg = load_config(SMOKE_CNN, ["output_dir=/nonexistent", "data.source=cifar10", f"data.root={root}", "data.val_on_test=true"])
        train_set, val_set = get_task("cnn", cfg).build_datasets(cfg)

        def stacked(dataset):
            return torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.tensor([dataset[i][1] for i in range(len(dataset))])

        return stacked(train_set), stacked(val_set)


@pytest.fixture(scope="module")
def model(data, one_thread):
    """smoke_cnn trained plainly for 8 epochs (under a second): 100 % clean validation accuracy."""
    (images, labels), _ = data
    torch.manual_seed(0)
    net = create_model("smoke_cnn", in_channels=3, num_classes=10, width=8)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=5e-4)
    for _ in range(8):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels) - 31, 32):
            batch = order[start:start + 32]
            loss = F.cross_entropy(net(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.zero_grad(set_to_none=True)  # so that a gradient found later came from an attack
    return net.eval()


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def assert_within_budget(adversarial, images, eps):
    assert adversarial.dtype == torch.float32
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    moved = (adversarial - images).abs().amax()
    assert moved <= eps + 1e-6
    assert moved >= eps - 1e-6  # the budget is used, not left idle


def test_fgsm_and_pgd_each_break_a_trained_model_and_pgd_is_at_least_as_strong(model, data):
    _, (images, labels) = data
    clean = accuracy(model, images, labels)
    torch.manual_seed(0)
    after_fgsm = accuracy(model, fgsm(model, images, labels, EPS), labels)
    after_pgd = accuracy(model, pgd(model, images, labels, EPS, alpha=2.5 * EPS / 10, steps=10), labels)
    print(f"clean {clean:.2f}, FGSM {after_fgsm:.2f}, PGD-10 {after_pgd:.2f} at eps {EPS}")
    assert clean >= 0.95
    assert after_fgsm <= clean - 0.4
    assert after_pgd <= clean - 0.7
    assert after_pgd <= after_fgsm


def test_attacks_stay_in_the_eps_ball_and_the_pixel_box_and_leave_the_model_alone(model, data):
    _, (images, labels) = data
    images, labels = images[:64], labels[:64]
    assert images.min() == 0 and images.max() == 1  # saturated pixels: the box clips there
    with torch.no_grad():  # as in evaluation: attacks turn gradients back on for themselves
        for adversarial in (fgsm(model, images, labels, EPS), fgsm(model, images, labels, EPS, random_start=True),
                            pgd(model, images, labels, EPS, alpha=EPS, steps=3, restarts=2)):
            assert_within_budget(adversarial, images, EPS)
    # uint8 batches (data.gpu_loader) are attacked as the float pixels they stand for
    pixels = (images * 255).round().to(torch.uint8)
    assert_within_budget(pgd(model, pixels, labels, 4 / 255, alpha=1 / 255, steps=5), pixels.float() / 255, 4 / 255)

    # In train mode (adversarial training): BatchNorm's running statistics stay as they were, the
    # model stays in its mode, and no gradient reaches the weights' .grad.
    model.train()
    try:
        before = {name: value.clone() for name, value in model.state_dict().items()}
        pgd(model, images, labels, EPS, alpha=EPS / 2, steps=3)
        fgsm(model, images, labels, EPS, random_start=True)
        assert model.training
        assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_restarts_never_weaken_the_attack(model, data):
    # A smaller budget, so that some samples survive one restart: there is something left to find.
    _, (images, labels) = data
    eps, alpha, steps = 0.075, 0.05, 2

    def attacked(restarts: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(1)  # the same first start for both
        with torch.no_grad():
            logits = model(pgd(model, images, labels, eps, alpha, steps, restarts=restarts))
        return logits.argmax(1) != labels, F.cross_entropy(logits, labels, reduction="none")

    wrong_one, loss_one = attacked(1)
    wrong_four, loss_four = attacked(4)
    print(f"robust accuracy at eps {eps}: 1 restart {1 - wrong_one.float().mean():.2f}, 4 restarts {1 - wrong_four.float().mean():.2f}")
    assert not (wrong_one & ~wrong_four).any()  # every sample fooled once stays fooled
    still_right = ~wrong_four
    assert (loss_four[still_right] >= loss_one[still_right] - 1e-5).all()  # and the others lose no loss
    assert wrong_four.sum() > wrong_one.sum() or (loss_four > loss_one + 1e-3).any()  # the extra restarts found something


def test_attacks_work_under_bf16_autocast(model, data):
    _, (images, labels) = data
    torch.manual_seed(0)
    fp32 = accuracy(model, pgd(model, images, labels, EPS, alpha=2.5 * EPS / 10, steps=10), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images[:2]).dtype == torch.bfloat16  # the model really computes in bf16 here
        torch.manual_seed(0)
        adversarial_pgd = pgd(model, images, labels, EPS, alpha=2.5 * EPS / 10, steps=10)
        adversarial_fgsm = fgsm(model, images, labels, EPS)
    for adversarial in (adversarial_pgd, adversarial_fgsm):
        assert_within_budget(adversarial, images, EPS)  # float32 perturbations, whatever the model's dtype
    clean, bf16 = accuracy(model, images, labels), accuracy(model, adversarial_pgd, labels)
    print(f"PGD-10 under bf16 autocast: {bf16:.2f} (float32: {fp32:.2f})")
    assert bf16 <= clean - 0.7 and abs(bf16 - fp32) <= 0.1
    assert accuracy(model, adversarial_fgsm, labels) <= clean - 0.4


def test_free_perturbation_persists_across_batches_and_steps_with_the_training_backward(model, data):
    (images, labels), _ = data
    first, second = images[:16], images[16:32]
    free = FreePerturbation(eps=0.1, step=0.06)
    trained = {name: value.clone() for name, value in model.state_dict().items()}
    model.train()
    try:
        inputs = free(first)
        assert torch.equal(inputs, first) and inputs.requires_grad  # starts from zero
        F.cross_entropy(model(inputs), labels[:16]).backward()  # the loop's own backward
        assert all(p.grad is not None for p in model.parameters())  # it trains the weights ...
        delta = 0.06 * inputs.grad.sign()  # ... and leaves the input gradient the next replay steps with
        assert torch.equal(free(first), (first + delta).clamp(0, 1))
        # A new batch (no backward in between) starts from the same perturbation, not from zero.
        inputs = free(second)
        assert torch.equal(inputs, (second + delta).clamp(0, 1))
        F.cross_entropy(model(inputs), labels[16:32]).backward()
        delta = (delta + 0.06 * inputs.grad.sign()).clamp(-0.1, 0.1)
        assert torch.equal(free(second), (second + delta).clamp(0, 1))
        assert (delta.abs() == 0.1).any() and delta.abs().max() <= 0.1  # two steps of 0.06: clipped to eps
    finally:  # train-mode forwards moved BatchNorm's running statistics: the other tests get the model back as trained
        model.load_state_dict(trained)
        model.zero_grad(set_to_none=True)
        model.eval()


def test_the_adversarial_config_section():
    cfg = load_config(SMOKE_CNN, ["adversarial.eps=8/255", "adversarial.eval_alpha=2/255"])
    assert cfg.adversarial.eps == pytest.approx(8 / 255) and cfg.adversarial.eval_alpha == pytest.approx(2 / 255)
    assert cfg.adversarial.mode == "none" and cfg.adversarial.eval_pgd_steps == 0  # off unless asked for
    with pytest.raises(ConfigError, match="adversarial.eps.*fraction such as 8/255"):
        load_config(SMOKE_CNN, ["adversarial.eps=8/zero"])
    with pytest.raises(ConfigError, match="adversarial.eps"):
        load_config(SMOKE_CNN, ["adversarial.eps=2"])  # more than the whole pixel range
    with pytest.raises(ConfigError, match="adversarial.mode"):
        load_config(SMOKE_CNN, ["adversarial.mode=trades"])
    cfg = load_config(SMOKE_CNN, ["adversarial.mode=free", "output_dir=/nonexistent"])
    with pytest.raises(ConfigError, match="adversarial.mode.*trainer.batch_replays"):
        get_task("cnn", cfg).build_model(cfg)


def test_plain_runs_are_unchanged_and_robust_evaluation_returns_both_logits(model, data):
    _, (images, labels) = data
    batch = (images[:32], labels[:32])
    plain = get_task("cnn", load_config(SMOKE_CNN, []))
    outputs = plain.forward(model, batch)
    assert isinstance(outputs, torch.Tensor) and torch.equal(outputs, model(batch[0]))
    assert set(plain.metrics(outputs, batch)) == {"loss", "acc"}

    robust = get_task("cnn", load_config(SMOKE_CNN, [f"adversarial.eps={EPS}", "adversarial.eval_pgd_steps=5"]))
    with torch.no_grad():  # as the loop evaluates
        outputs = robust.forward(model, batch)
    assert isinstance(outputs, RobustOutputs) and torch.equal(outputs.clean, model(batch[0]))
    metrics = robust.metrics(outputs, batch)
    assert set(metrics) == {"loss", "acc", "robust_loss", "robust_acc"} and all(v.shape == (32,) for v in metrics.values())
    assert metrics["robust_acc"].mean() < metrics["acc"].mean() - 0.4
    assert robust.loss(outputs, batch).item() == pytest.approx(plain.loss(model(batch[0]), batch).item())


# ---- the loop end to end ------------------------------------------------------------------------------

EPOCHS, BATCHES = 6, 8  # smoke config: 256 training images in batches of 32
# The same data, seed and number of updates in each mode, all evaluated under PGD-10 at EPS; a stronger
# lr than the smoke config's, so that 48 updates learn enough.
COMMON = [f"trainer.epochs={EPOCHS}", "optim.lr=0.02", f"adversarial.eps={EPS}", "adversarial.eval_pgd_steps=10",
          "trainer.eval_every_epochs=0", "log.wandb=disabled", "log.plot=false", "log.progress=plain"]
RUNS = {
    "plain": ["adversarial.mode=none"],
    "fgsm": ["adversarial.mode=fgsm"],
    "pgd": ["adversarial.mode=pgd", "adversarial.train_steps=3", "trainer.mixed_precision=bf16"],  # autocast on the CPU
    "free": ["adversarial.mode=free", "trainer.batch_replays=2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> dict[str, list[dict]]:
    """The metrics of a run in each mode, trained in this process as train.py trains (its command line
    is tested elsewhere; here a process start would cost more than the run)."""
    def run(name: str) -> list[dict]:
        run_dir = tmp_path_factory.mktemp(name)
        reset_accelerate_state()  # the pgd run's bf16 after the others' full precision
        train(load_config(SMOKE_CNN, [f"output_dir={run_dir}", *COMMON, *RUNS[name]]))
        return read_metrics(run_dir)

    return {name: run(name) for name in RUNS}


@pytest.mark.parametrize("name", RUNS)
def test_each_mode_trains_end_to_end_and_logs_robust_accuracy(runs, name):
    final = runs[name][-1]
    assert {"val/acc", "val/loss", "val/robust_acc", "val/robust_loss"} <= set(final)
    assert final["val/acc"] >= 0.9
    assert all(math.isfinite(row["train/loss"]) for row in runs[name] if "train/loss" in row)


def test_free_training_keeps_epochs_x_batches_updates_over_epochs_over_m_passes(runs):
    # m = 2 replays: as many updates as the plain run, each batch trained on twice, half the passes.
    assert runs["free"][-1]["step"] == runs["plain"][-1]["step"] == EPOCHS * BATCHES
    assert runs["plain"][-1]["epoch"] == EPOCHS and runs["free"][-1]["epoch"] == EPOCHS / 2


def test_adversarial_training_beats_plain_training_under_pgd(runs):
    robust = {name: rows[-1]["val/robust_acc"] for name, rows in runs.items()}
    print("val/acc / val/robust_acc:", {name: (rows[-1]["val/acc"], rows[-1]["val/robust_acc"]) for name, rows in runs.items()})
    assert robust["plain"] <= 0.3
    assert robust["fgsm"] >= robust["plain"] + 0.4
    assert robust["pgd"] >= robust["plain"] + 0.4
    assert robust["free"] >= robust["plain"] + 0.15  # m = 2 only: half the passes, the weakest attack


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["adversarial.mode=pgd", "adversarial.train_steps=2"], ["adversarial.mode=free", "trainer.batch_replays=2"]])
def test_adversarial_training_and_robust_evaluation_under_two_processes(tmp_path, mode):
    # DistributedDataParallel: attacks differentiate its inner module, or its gradient reducer would wait
    # for a weight gradient that never comes. With EMA, val_raw/* evaluates the DDP-wrapped model too.
    result = accelerate_launch(2, "train.py", SMOKE_CNN, f"output_dir={tmp_path}", "trainer.batch_size=16", "trainer.epochs=2",
                               f"adversarial.eps={EPS}", "adversarial.eval_pgd_steps=3", "ema.enabled=true", "log.wandb=disabled",
                               "log.plot=false", *mode)
    assert result.returncode == 0, result.stderr[-3000:]
    final = read_metrics(tmp_path)[-1]
    assert final["step"] == 16 and {"val/robust_acc", "val_raw/robust_acc"} <= set(final)
