"""SimSiam: stop-gradient, negative-cosine loss, collapse monitor, --fix-pred-lr, architecture, end to end (one process,
resume, torchrun, linear_eval.py reading the checkpoint). Its errors are the scaffold's: tests/test_errors.py."""
import contextlib
import copy
import io
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as models

import linear_eval
import simsiam
from conftest import run_script

# the short run of simsiam.py (tests/test_scaffold.py): 32 images of 16 px, global batch 16: 2 steps an epoch
# (2 processes: 2 steps of 8 each)
TINY = ["--data", "synthetic:32", "-a", "resnet18", "-b", "16", "--dim", "128", "--pred-dim", "32", "-j", "0",
        "--image-size", "16", "--seed", "0", "-p", "1", "--fix-pred-lr"]
TINY += ["--stem", "imagenet", "--knn-every", "0"]  # the CIFAR stem and the monitor: test_monitor.py
INIT_LR = 0.05 * 16 / 256  # Sec. 3: lr × BatchSize/256, from the global batch


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """Two cores shared with other jobs: one intra-op thread, also for the module's shared run (conftest.one_thread
    is per test, set up after a module fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    """Stands in for a torchvision ResNet: `num_classes` sets fc's output, `fc` is the head that
    SimSiam turns into the projector, and a BatchNorm makes outputs depend on the batch."""

    def __init__(self, num_classes: int = 8, zero_init_residual: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def tiny_simsiam(seed=0):
    torch.manual_seed(seed)
    return simsiam.SimSiam(TinyNet, dim=8, pred_dim=4).train()


def mean_cosine_by_hand(a, b):
    return sum(float(a[i] @ b[i]) / (float(a[i].norm()) * float(b[i].norm())) for i in range(len(a))) / len(a)


# ------------------------------------------------------------------------------- stop-gradient
def test_D_gives_no_gradient_to_z_and_the_closed_form_one_to_p():
    torch.manual_seed(0)
    p, z = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    grad_p, grad_z = torch.autograd.grad(simsiam.D(p, z), [p, z], allow_unused=True)
    assert grad_z is None  # Eq. (3): z enters as stopgrad(z), a constant
    p_hat, z_hat = F.normalize(p.detach(), dim=1), F.normalize(z.detach(), dim=1)
    cos = (p_hat * z_hat).sum(1, keepdim=True)
    # ∂(−mean cos)/∂p_i = −(ẑ_i − cos_i·p̂_i) / (‖p_i‖·N)
    expected = -(z_hat - cos * p_hat) / (p.detach().norm(dim=1, keepdim=True) * 6)
    torch.testing.assert_close(grad_p, expected)


def test_encoder_gradient_treats_the_other_views_z_as_a_constant():
    """After backward of D(p1, z2) alone, the encoder's gradient is the one computed by hand with z2 a
    constant; the case is built so that a gradient through z2 would change it."""
    model = tiny_simsiam()
    by_hand, through_z2 = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(1)
    x1, x2 = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    p1, p2, z1, z2 = model(x1, x2)
    simsiam.D(p1, z2).backward()
    z2_const = by_hand.encoder(x2).detach()
    (-F.cosine_similarity(by_hand.predictor(by_hand.encoder(x1)), z2_const).mean()).backward()
    (-F.cosine_similarity(through_z2.predictor(through_z2.encoder(x1)), through_z2.encoder(x2)).mean()).backward()
    for a, b, c in zip(model.encoder.parameters(), by_hand.encoder.parameters(), through_z2.encoder.parameters()):
        assert (a.grad is None) == (b.grad is None) == (c.grad is None) == (not a.requires_grad)
    grads = [[p.grad for p in m.encoder.parameters() if p.grad is not None] for m in (model, by_hand, through_z2)]
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b)
    assert not all(torch.allclose(a, c) for a, c in zip(grads[0], grads[2]))  # the test can tell them apart
    assert all(p.grad is not None for p in model.predictor.parameters())


# ---------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("scale", [1.0, 0.01, 37.0])
def test_loss_is_minus_one_when_each_prediction_equals_the_other_views_z(scale):
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(simsiam.simsiam_loss(scale * z2, scale * z1, z1, z2), torch.tensor(-1.0))
    torch.testing.assert_close(simsiam.simsiam_loss(-scale * z2, -scale * z1, z1, z2), torch.tensor(1.0))


def test_loss_equals_eq_4_by_hand_on_random_tensors():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(7, 16) for _ in range(4))
    expected = -mean_cosine_by_hand(p1, z2) / 2 - mean_cosine_by_hand(p2, z1) / 2  # p1 with z2, p2 with z1
    torch.testing.assert_close(simsiam.simsiam_loss(p1, p2, z1, z2), torch.tensor(expected))


# ----------------------------------------------------------------------------- collapse monitor
@pytest.mark.parametrize("N, d", [(4096, 128), (512, 2048)])
def test_collapse_std_is_one_over_sqrt_d_for_gaussian_outputs(N, d):
    """Each coordinate of z/‖z‖ for isotropic Gaussian z has variance exactly 1/d. The per-channel
    sample std has a relative sd ≈ 1/√(2N) (1.1 % at N = 4096, 3 % at 512); the mean over d nearly
    independent channels divides that by √d (0.1 %, 0.07 %), and the bias of the sample std is
    ≈ 1/(4N) (< 0.05 %). A 1 % tolerance is about 10 sd; 3·z shows the scale of z does not matter."""
    torch.manual_seed(0)
    std = float(simsiam.collapse_std(3 * torch.randn(N, d)))
    assert abs(std * math.sqrt(d) - 1) < 0.01


def test_collapse_std_is_zero_when_every_output_has_the_same_direction():
    torch.manual_seed(0)
    v = torch.randn(128)
    z = (0.1 + 10 * torch.rand(256, 1)) * v  # different lengths, one direction: collapsed after normalising
    assert float(simsiam.collapse_std(z)) < 1e-6


# ------------------------------------------------------------------------------- --fix-pred-lr
@pytest.mark.parametrize("fix", [True, False])
def test_fix_pred_lr_keeps_the_predictor_at_init_lr_while_the_rest_decays(fix):
    model = tiny_simsiam()
    args = simsiam.parse_args(["--data", "synthetic"] + (["--fix-pred-lr"] if fix else []))
    args.init_lr = 0.05 * 512 / 256  # paper defaults: base lr 0.05, batch 512
    optimizer = torch.optim.SGD([{"params": model.encoder.parameters(), "fix_lr": False},
                                 {"params": model.predictor.parameters(), "fix_lr": args.fix_pred_lr}], 123.0)
    for epoch in (0, 50, 90):
        simsiam.adjust_learning_rate(optimizer, epoch, args)
        cosine = 0.1 * 0.5 * (1 + math.cos(math.pi * epoch / 100))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine, rel=1e-12)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1 if fix else cosine, rel=1e-12)
    assert optimizer.param_groups[0]["lr"] < 0.003  # epoch 90: decayed to ≈2.4 % of init_lr


# -------------------------------------------------------------------------------- architecture
def layer_types(seq):
    return [type(m).__name__ for m in seq]


def test_architecture_at_the_paper_defaults_resnet50():
    model = simsiam.SimSiam(models.resnet50)
    fc, pred = model.encoder.fc, model.predictor
    assert layer_types(fc) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]  # no ReLU at the end
    assert [(fc[i].in_features, fc[i].out_features, fc[i].bias is None) for i in (0, 3)] == [(2048, 2048, True)] * 2
    assert (fc[6].in_features, fc[6].out_features, fc[6].bias.requires_grad) == (2048, 2048, False)
    assert fc[1].affine and fc[4].affine
    assert not fc[7].affine and fc[7].weight is None and fc[7].bias is None and fc[7].num_features == 2048
    assert layer_types(pred) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]  # no BN on the output (Sec. 4.4)
    assert (pred[0].in_features, pred[0].out_features, pred[0].bias is None) == (2048, 512, True)
    assert (pred[3].in_features, pred[3].out_features, pred[3].bias is not None) == (512, 2048, True)
    assert all(not block.bn3.weight.any() for layer in (model.encoder.layer1, model.encoder.layer4)
               for block in layer)  # zero_init_residual=True


def test_resnet18_with_dim_and_pred_dim_and_z_is_batch_normalised():
    torch.manual_seed(0)
    model = simsiam.SimSiam(models.resnet18, dim=128, pred_dim=32).train()
    assert [(m.in_features, m.out_features) for m in model.encoder.fc if isinstance(m, nn.Linear)] == \
        [(512, 512), (512, 512), (512, 128)]
    assert [(m.in_features, m.out_features) for m in model.predictor if isinstance(m, nn.Linear)] == [(128, 32), (32, 128)]
    assert all(not block.bn2.weight.any() for block in model.encoder.layer2)
    p1, p2, z1, z2 = model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))
    assert p1.shape == z1.shape == (8, 128)
    # the last BN has no affine: z has per-channel batch mean 0 and variance 1 (up to eps)
    torch.testing.assert_close(z1.mean(0), torch.zeros(128), atol=1e-5, rtol=0)
    torch.testing.assert_close(z1.var(0, unbiased=False), torch.ones(128), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------- end to end
def load(folder):
    return torch.load(folder / "checkpoint.pth.tar", weights_only=True)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """One epoch of TINY in this process (a failure raises SystemExit here), made once: the checkpoint the tests
    below read, resume and evaluate."""
    out = tmp_path_factory.mktemp("simsiam_one_epoch")
    with contextlib.redirect_stdout(io.StringIO()):
        simsiam.main(TINY + ["--epochs", "1", "--output-dir", str(out)])
    return out


def check_param_groups(ckpt, lr_encoder):
    reference = simsiam.SimSiam(models.resnet18, dim=128, pred_dim=32)
    groups = ckpt["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [len(list(reference.encoder.parameters())),
                                                  len(list(reference.predictor.parameters()))]
    assert [g["fix_lr"] for g in groups] == [False, True]
    assert groups[0]["lr"] == pytest.approx(lr_encoder, rel=1e-12)
    assert groups[1]["lr"] == pytest.approx(INIT_LR, rel=1e-12)  # --fix-pred-lr


@pytest.mark.slow
def test_checkpoint_keys_shapes_log_and_lr(one_epoch):
    ckpt = load(one_epoch)
    assert (ckpt["method"], ckpt["arch"], ckpt["epoch"], ckpt["step"]) == ("simsiam", "resnet18", 1, 0)
    state = ckpt["state_dict"]
    assert all(k.startswith(("module.encoder.", "module.predictor.")) for k in state)
    assert state["module.encoder.fc.6.weight"].shape == (128, 512)  # --dim 128 on ResNet-18's 512
    assert state["module.predictor.0.weight"].shape == (32, 128) and state["module.predictor.3.weight"].shape == (128, 32)
    assert "module.encoder.fc.7.running_mean" in state and "module.encoder.fc.7.weight" not in state
    assert ckpt["args"]["init_lr"] == pytest.approx(INIT_LR)
    check_param_groups(ckpt, INIT_LR)  # epoch 0: cos(0) = 1
    log = [json.loads(line) for line in (one_epoch / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and set(log[0]) == {"epoch", "loss", "z_std", "lr"}
    assert -1 <= log[0]["loss"] <= 1 and 0 < log[0]["z_std"] < 1


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_run(one_epoch, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    shutil.copytree(one_epoch, split)
    path = split / "checkpoint.pth.tar"  # --resume with a path (test_moco.py: auto)
    simsiam.main(TINY + ["--epochs", "2", "--output-dir", str(split), "--resume", str(path)])
    out = capsys.readouterr().out
    assert f"=> loaded checkpoint '{path}' (epoch 1)" in out
    assert "Epoch: [1][0/2]" in out and "Epoch: [0]" not in out and "Std(z)" in out
    assert len((split / "log.txt").read_text().splitlines()) == 2
    simsiam.main(TINY + ["--epochs", "2", "--output-dir", str(straight)])
    a, b = load(straight), load(split)
    assert a["epoch"] == b["epoch"] == 2 and a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # weights and BN statistics
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][key]["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    check_param_groups(b, INIT_LR * 0.5 * (1 + math.cos(math.pi * 1 / 2)))


@pytest.mark.slow
def test_two_process_run_with_torchrun(tmp_path):
    proc = run_script("simsiam.py", *TINY, "--epochs", "1", "--output-dir", tmp_path, nproc=2, timeout=90,
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Epoch: [0][0/2]") == 1  # 32 images, global batch 16: 2 steps of 8 a rank; rank 0 prints
    ckpt = load(tmp_path)
    assert ckpt["epoch"] == 1 and all(k.startswith(("module.encoder.", "module.predictor.")) for k in ckpt["state_dict"])
    check_param_groups(ckpt, INIT_LR)  # init_lr from the global batch 16, not the per-process 8
    done = f"=> done: epoch 1 of 1; checkpoint '{tmp_path / 'checkpoint.pth.tar'}'"
    assert proc.stdout.strip().splitlines()[-1] == done


@pytest.mark.slow
def test_linear_eval_knn_and_simsiam_protocol_read_the_checkpoint(one_epoch, tmp_path, capsys):
    path = one_epoch / "checkpoint.pth.tar"
    state = load(one_epoch)["state_dict"]
    backbone, _ = linear_eval.load_backbone(str(path), None, "auto")
    for key, value in backbone.state_dict().items():  # the encoder without its projector, bit for bit
        assert torch.equal(value, state["module." + key]), key
    assert not any(k.startswith("fc.") for k in backbone.encoder.state_dict())
    assert "SimSiam (ours or official)" in capsys.readouterr().out
    argv = ["--data", "synthetic:32", "--pretrained", str(path), "-j", "0", "-b", "16", "--image-size", "16",
            "--seed", "0"]
    knn = linear_eval.main(argv + ["--knn", "--output-dir", str(tmp_path / "knn")])
    assert 0 <= knn["knn_acc1"] <= 100
    out = capsys.readouterr().out
    assert "SimSiam (ours or official)" in out and "module.predictor.* (" in out  # the predictor is left out
    lars = linear_eval.main(argv + ["--protocol", "simsiam", "--epochs", "1", "--output-dir", str(tmp_path / "lars")])
    assert lars["epoch"] == 0 and 0 <= lars["acc1"] <= 100
    assert "sanity check passed" in capsys.readouterr().out
