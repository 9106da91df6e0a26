"""BYOL: τ schedule, target EMA and stop-gradient, loss (Eq. 2, symmetrised), LARS, lr schedule, end to end (a run
in this process, its resume and linear_eval; the command line under torchrun). Start-up errors: test_errors.py."""
import argparse
import contextlib
import io
import json
import math
import shutil
import types

import pytest
import torch
import torch.nn as nn

import byol
import linear_eval
from conftest import run_script

TINY = ["--data", "synthetic:64", "-a", "resnet18", "-b", "16", "--image-size", "8", "--dim", "16",
        "--hidden-dim", "32", "--warmup-epochs", "1", "-j", "0", "--seed", "0", "-p", "2"]
TINY += ["--stem", "imagenet", "--knn-every", "0"]  # the CIFAR stem and the monitor: test_monitor.py
STEPS = 4  # 64 images, global batch 16 (tests/test_preemption.py counts on it too)
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """Stands in for a torchvision ResNet: `num_classes` sets the output, `fc` is the head."""

    def __init__(self, num_classes: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def tiny_byol(seed=0):
    torch.manual_seed(seed)
    return byol.BYOL(TinyNet, dim=8, hidden_dim=16)


def perturb_target(model):
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(torch.randn_like(p))


# ------------------------------------------------------------------------------------ τ schedule
def test_tau_schedule_closed_form():
    K, base = 1000, 0.996
    assert byol.target_tau(0, K, base) == pytest.approx(base, abs=1e-12)
    assert byol.target_tau(K, K, base) == pytest.approx(1.0, abs=1e-12)
    for k in (1, 250, 500, 999):
        expected = 1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2
        assert byol.target_tau(k, K, base) == pytest.approx(expected, abs=1e-12)
    assert byol.target_tau(500, K, base) == pytest.approx(0.998, abs=1e-12)  # halfway in (τ_base, 1)
    taus = [byol.target_tau(k, K, base) for k in range(K + 1)]
    assert all(a < b for a, b in zip(taus, taus[1:]))  # increasing


def test_lr_schedule_is_warmup_then_cosine_per_step():
    args = argparse.Namespace(init_lr=0.8, warmup_epochs=2, epochs=6)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    steps_per_epoch, warmup = 5, 10  # 6 epochs: 30 steps in all
    for step, expected in [(0, 0.0), (3, 0.8 * 3 / warmup), (9, 0.8 * 9 / warmup), (warmup, 0.8),
                           (20, 0.8 * 0.5 * (1 + math.cos(math.pi * 10 / 20))), (29, 0.8 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))]:
        byol.adjust_learning_rate(opt, step, steps_per_epoch, args)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), step


# ------------------------------------------------------------------------------- EMA, stop-grad
def test_target_starts_as_a_copy_and_is_frozen():
    model = tiny_byol()
    online, target = model.encoder.state_dict(), model.target_encoder.state_dict()
    assert online.keys() == target.keys()
    for key in online:
        assert torch.equal(online[key], target[key]), key
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    assert model.target_encoder.fc[0].weight.data_ptr() != model.encoder.fc[0].weight.data_ptr()  # not shared


def test_ema_update_is_eq_1_for_every_parameter():
    model, tau = tiny_byol(), 0.9
    perturb_target(model)
    before = {k: v.clone() for k, v in model.target_encoder.state_dict().items()}
    online = dict(model.encoder.named_parameters())
    model._update_target_network(tau)
    names = set()
    for name, p in model.target_encoder.named_parameters():
        torch.testing.assert_close(p, tau * before[name] + (1 - tau) * online[name], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(p, before[name])
        names.add(name)
    assert names == set(online)  # every online parameter has its target, projector included
    for name, buf in model.target_encoder.named_buffers():  # BN statistics are not averaged
        assert torch.equal(buf, before[name]), name


def test_target_gets_no_gradient_and_online_predictor_and_encoder_do():
    model = tiny_byol().train()
    p1, p2, z1, z2 = model(torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6))
    assert not z1.requires_grad and not z2.requires_grad
    byol.byol_loss(p1, p2, z1, z2).backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    for name, p in list(model.encoder.named_parameters()) + list(model.predictor.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_regression_loss_detaches_its_target():
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    byol.regression_loss(p, z).sum().backward()
    assert p.grad is not None and z.grad is None


def test_forward_pairs_each_prediction_with_its_own_view():
    model = tiny_byol().eval()  # eval: BN without batch dependence, so outputs compare one to one
    perturb_target(model)
    x1, x2 = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    p1, p2, z1, z2 = model(x1, x2)
    torch.testing.assert_close(p1, model.predictor(model.encoder(x1)))
    torch.testing.assert_close(p2, model.predictor(model.encoder(x2)))
    torch.testing.assert_close(z1, model.target_encoder(x1))
    torch.testing.assert_close(z2, model.target_encoder(x2))


def test_projector_is_the_encoder_fc_and_predictor_has_the_same_shape():
    model = byol.BYOL(byol.models.resnet18, dim=256, hidden_dim=4096)
    for head, in_features in ((model.encoder.fc, 512), (model.predictor, 256)):
        linear1, bn, relu, linear2 = head
        assert (linear1.in_features, linear1.out_features) == (in_features, 4096)
        assert isinstance(bn, nn.BatchNorm1d) and isinstance(relu, nn.ReLU)
        assert (linear2.in_features, linear2.out_features) == (4096, 256)


def test_bottleneck_blocks_start_as_the_identity_in_online_and_target():
    """Official haiku ResNet (BlockV1): γ = 0 in the last BN of each bottleneck block (ResNet-50+),
    the basic blocks of ResNet-18/34 keep γ = 1 unless --zero-init-basic (and only those: a ResNet-50
    is the same with it); every other BN has γ = 1. The target starts equal."""
    for arch, last, zero, basic in (("resnet50", "bn3", True, False), ("resnet18", "bn2", False, False),
                                    ("resnet50", "bn3", True, True), ("resnet18", "bn2", True, True)):
        model = byol.BYOL(byol.models.__dict__[arch], dim=8, hidden_dim=16, zero_init_basic=basic)
        for encoder in (model.encoder, model.target_encoder):
            blocks = [block for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)
                      for block in layer]
            assert all(torch.all(getattr(block, last).weight == (0 if zero else 1)) for block in blocks)
            others = [m.weight for name, m in encoder.named_modules()
                      if isinstance(m, nn.BatchNorm2d) and not name.endswith(last)]
            assert others and all(torch.all(w == 1) for w in others)


@pytest.mark.parametrize("flag, expected", [([], False), (["--zero-init-basic"], True)])
def test_zero_init_basic_flag_reaches_the_model(flag, expected, tmp_path, monkeypatch):
    """main() hands --zero-init-basic to BYOL (stopped there: the init itself is checked above)."""
    def built(base_encoder, dim, hidden_dim, zero_init_basic):
        raise SystemExit(f"zero_init_basic={zero_init_basic}")
    monkeypatch.setattr(byol, "BYOL", built)
    with pytest.raises(SystemExit, match=f"zero_init_basic={expected}"):
        byol.main(TINY + flag + ["--epochs", "1", "--output-dir", str(tmp_path)])


# ------------------------------------------------------------------------------------------ loss
def test_loss_is_0_for_the_same_direction_and_4_for_the_opposite():
    p = torch.randn(5, 8)
    for scale in (1e-3, 1.0, 7.5):
        torch.testing.assert_close(byol.regression_loss(p, scale * p), torch.zeros(5), atol=1e-6, rtol=0)
        torch.testing.assert_close(byol.regression_loss(p, -scale * p), torch.full((5,), 4.0), atol=1e-6, rtol=0)
    q, z = torch.randn(5, 8), torch.randn(5, 8)
    orthogonal = z - (z * q).sum(1, keepdim=True) / (q * q).sum(1, keepdim=True) * q
    torch.testing.assert_close(byol.regression_loss(q, orthogonal), torch.full((5,), 2.0), atol=1e-5, rtol=0)


def test_loss_is_eq_2_symmetrised_as_the_sum_of_both_directions():
    p1, p2, z1, z2 = (torch.randn(6, 8) for _ in range(4))

    def by_hand(p, z):  # Eq. (2), both forms: ‖p̄ − z̄‖² and 2 − 2·⟨p, z⟩/(‖p‖·‖z‖)
        mse = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1)
        torch.testing.assert_close(mse, 2 - 2 * (p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1)))
        return mse.mean()

    expected = by_hand(p1, z2) + by_hand(p2, z1)  # L + L̃ (Sec. 3.1): each view predicts the other's target
    torch.testing.assert_close(byol.byol_loss(p1, p2, z1, z2), expected)
    assert not torch.allclose(byol.byol_loss(p1, p2, z1, z2), by_hand(p1, z1) + by_hand(p2, z2))  # same-view pairs
    assert not torch.allclose(byol.byol_loss(p1, p2, z1, z2), expected / 2)  # a mean, not the sum


# ------------------------------------------------------------------- prediction collapse monitor
def test_a_constant_prediction_on_the_targets_mean_direction_scores_2_times_2_minus_2_sqrt_c():
    """The plateau docs/byol.md names: every image predicted as the mean m of the normalised targets
    scores cos = |m| with each target on average, and |m|² is the targets' mean pairwise cosine c."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(64, 32) + 0.8, torch.randn(64, 32) + 0.8  # a common component, as a ReLU layer gives
    m1, m2 = (torch.nn.functional.normalize(z, dim=1).mean(0) for z in (z1, z2))
    p1, p2 = m2.expand(64, 32) * 3.0, m1.expand(64, 32) * 0.5  # constant, any length; p1 predicts z2
    c1, c2 = float(m1 @ m1), float(m2 @ m2)
    assert 0.2 < c1 < 0.6 and 0.2 < c2 < 0.6
    expected = (2 - 2 * math.sqrt(c2)) + (2 - 2 * math.sqrt(c1))
    assert float(byol.byol_loss(p1, p2, z1, z2)) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("c", [0.0, 0.31, 0.9])
def test_prediction_std_is_sqrt_of_1_minus_c_over_d(c):
    """Unit predictions √c·u + √(1−c)·n with n isotropic (d = 256, the default): mean pairwise cosine
    ≈ c, and the per-channel std of the normalised predictions ≈ √((1−c)/d); the scale of p is
    irrelevant. 2 % is about 10 sd of the estimate at N = 4096."""
    torch.manual_seed(0)
    N, d = 4096, 256
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    n = torch.randn(N, d) / math.sqrt(d)
    p = 5.0 * (math.sqrt(c) * u + math.sqrt(1 - c) * n)
    assert float(byol.prediction_std(p)) == pytest.approx(math.sqrt((1 - c) / d), rel=0.02)


def test_prediction_std_is_zero_when_every_prediction_has_the_same_direction():
    torch.manual_seed(0)
    p = (0.1 + 10 * torch.rand(64, 1)) * torch.randn(256)
    assert float(byol.prediction_std(p)) < 1e-6


# ------------------------------------------------------------------------------------------ LARS
def test_lars_is_linear_evals_larc_then_sgd():
    """The same LARS maths in both scripts: byol.LARS's step equals linear_eval's larc_ (g + λw, scaled by
    η‖w‖/‖g + λw‖) then a plain SGD step with momentum, over three steps (the momentum buffers carry over)."""
    torch.manual_seed(0)
    w, w_ref = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.empty(4, 3))
    b, b_ref = nn.Parameter(torch.randn(4)), nn.Parameter(torch.empty(4))
    with torch.no_grad():
        w_ref.copy_(w), b_ref.copy_(b)
    lars = byol.LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}], 0.5,
                     momentum=0.9, weight_decay=0.1)
    sgd = torch.optim.SGD([w_ref, b_ref], lr=0.5, momentum=0.9)
    for _ in range(3):
        gw, gb = torch.randn(4, 3), torch.randn(4)
        w.grad, b.grad, w_ref.grad, b_ref.grad = gw.clone(), gb.clone(), gw.clone(), gb.clone()
        lars.step()
        linear_eval.larc_([w_ref], weight_decay=0.1)  # the excluded bias: no decay, no trust ratio
        sgd.step()
        torch.testing.assert_close(w.detach(), w_ref.detach())
        torch.testing.assert_close(b.detach(), b_ref.detach())


def test_lars_two_steps_by_hand_and_excluded_params_are_plain_sgd():
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    lr, m, wd, eta = 0.5, 0.9, 0.1, 0.001
    opt = byol.LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}], lr,
                    momentum=m, weight_decay=wd)
    w_ref, b_ref, buf_w, buf_b = w.detach().clone(), b.detach().clone(), torch.zeros(4, 3), torch.zeros(4)
    for _ in range(2):
        gw, gb = torch.randn(4, 3), torch.randn(4)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        g = gw + wd * w_ref  # Alg. 1: g + λw, scaled by η‖w‖/‖g + λw‖
        buf_w = m * buf_w + eta * w_ref.norm() / g.norm() * g
        w_ref = w_ref - lr * buf_w
        buf_b = m * buf_b + gb  # excluded: no weight decay, no trust ratio
        b_ref = b_ref - lr * buf_b
        torch.testing.assert_close(w.detach(), w_ref)
        torch.testing.assert_close(b.detach(), b_ref)


def test_param_groups_exclude_every_bias_and_bn_and_skip_the_target():
    model = tiny_byol()
    decayed, excluded = byol.lars_param_groups(model)
    assert excluded["lars_exclude"] and excluded["weight_decay"] == 0.0 and "lars_exclude" not in decayed
    online = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in decayed["params"] + excluded["params"]} == {id(p) for p in online}
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in excluded["params"])
    bn_and_bias = [model.encoder.body[1].weight, model.encoder.body[1].bias, model.encoder.fc[0].bias,
                   model.encoder.fc[1].weight, model.predictor[1].bias]
    assert all(any(p is q for q in excluded["params"]) for p in bn_and_bias)


# ----------------------------------------------------------------------------------- train step
def test_train_step_uses_the_global_step_and_updates_the_target_after_the_online_step():
    model = tiny_byol()
    perturb_target(model)
    args = argparse.Namespace(epochs=6, warmup_epochs=1, init_lr=0.5, tau_base=0.9, print_freq=1, amp=False)
    optimizer = byol.LARS(byol.lars_param_groups(model), args.init_lr, momentum=0.9, weight_decay=1e-3)
    loader = [([torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)], torch.zeros(4))] * 2  # 2 steps an epoch
    calls, update = [], model._update_target_network

    def recording_update(tau):
        calls.append((tau, {k: v.clone() for k, v in model.target_encoder.named_parameters()},
                      {k: v.clone() for k, v in model.encoder.named_parameters()}))
        update(tau)

    model._update_target_network = recording_update
    run = types.SimpleNamespace(steps=lambda loader, epoch: enumerate(loader), device=torch.device("cpu"), rank=0)
    metrics = byol.train_one_epoch(loader, model, optimizer, 3, args, run)
    # epoch 3 of 6 with 2 steps an epoch: global steps 6 and 7 of K = 12
    assert [tau for tau, _, _ in calls] == pytest.approx([byol.target_tau(k, 12, 0.9) for k in (6, 7)], abs=1e-12)
    assert metrics["tau"] == pytest.approx(byol.target_tau(7, 12, 0.9), abs=1e-12)
    assert 0 < metrics["p_std"] < 1 and math.isfinite(metrics["p_std"])
    assert metrics["lr"] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * (7 - 2) / (12 - 2))), abs=1e-12)
    tau, target_before, online_then = calls[-1]
    online_now = dict(model.encoder.named_parameters())
    for name, p in model.target_encoder.named_parameters():
        assert torch.equal(online_then[name], online_now[name]), name  # Eq. (4): EMA after the online step
        torch.testing.assert_close(p, tau * target_before[name] + (1 - tau) * online_now[name], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """In this process, at one thread: a 2-epoch run straight through (τ and lr run over K = 2 epochs), a copy of its
    checkpoint after epoch 1 (the file a run killed then leaves), and that copy resumed with --resume auto."""
    root, threads = tmp_path_factory.mktemp("byol"), torch.get_num_threads()
    straight, split = root / "straight", root / "split"
    split.mkdir()
    save = byol.save_checkpoint

    def save_and_copy_epoch_1(state, path):
        save(state, path)
        if (state["epoch"], state["step"]) == (1, 0):
            shutil.copy(path, split / "checkpoint.pth.tar")

    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
            patch.setattr(byol, "save_checkpoint", save_and_copy_epoch_1)
            byol.main(TINY + ["--epochs", "2", "--output-dir", str(straight)])
        epoch_1 = torch.load(split / "checkpoint.pth.tar", weights_only=True)
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            byol.main(TINY + ["--epochs", "2", "--output-dir", str(split), "--resume", "auto"])
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(straight=straight, split=split, epoch_1=epoch_1, resumed_stdout=stdout.getvalue())


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_run(runs):
    stdout = runs.resumed_stdout
    assert "(epoch 1)" in stdout and "Epoch: [1]" in stdout and "Epoch: [0]" not in stdout
    a, b = (torch.load(d / "checkpoint.pth.tar", weights_only=True) for d in (runs.straight, runs.split))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("module.target_encoder.") for k in a["state_dict"])
    for key in a["state_dict"]:  # online, target, BN statistics
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    K = 2 * STEPS
    assert a["tau"] == b["tau"] == pytest.approx(byol.target_tau(K - 1, K, 0.996), abs=1e-12)  # τ of the last step
    assert runs.epoch_1["tau"] == pytest.approx(byol.target_tau(STEPS - 1, K, 0.996), abs=1e-12)
    fc = "module.encoder.fc.3.weight"
    assert not torch.equal(runs.epoch_1["state_dict"][fc], a["state_dict"][fc])  # the resume trained epoch 1
    log = [json.loads(line) for line in (runs.straight / "log.txt").read_text().splitlines()]
    assert [json.loads(line) for line in (runs.split / "log.txt").read_text().splitlines()] == log[1:]
    assert set(log[0]) == {"epoch", "loss", "p_std", "tau", "lr"}  # --knn-every 0: no knn_acc1
    init_lr = 0.2 * 16 / 256  # lr × batch/256; warm-up = epoch 0, then cosine over the 4 steps of epoch 1
    assert log[0]["lr"] == pytest.approx(init_lr * 3 / 4, abs=1e-12)
    assert log[1]["lr"] == pytest.approx(init_lr * 0.5 * (1 + math.cos(math.pi * 3 / 4)), abs=1e-12)


@pytest.mark.slow
def test_checkpoint_and_linear_eval(runs, tmp_path, capsys):
    ckpt = torch.load(runs.straight / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["method"] == "byol" and ckpt["arch"] == "resnet18"
    keys = list(ckpt["state_dict"])
    assert all(k.startswith(("module.encoder.", "module.predictor.", "module.target_encoder.")) for k in keys)
    for prefix in ("module.encoder.conv1.", "module.encoder.fc.0.", "module.predictor.3.", "module.target_encoder.fc.3."):
        assert any(k.startswith(prefix) for k in keys), prefix
    # linear_eval.py in this process (its command line: test_linear_eval.py); a failure raises SystemExit here
    evaluate = ["--data", "synthetic:64", "--image-size", "8", "-j", "0", "-b", "16", "--seed", "0",
                "--pretrained", str(runs.straight / "checkpoint.pth.tar"), "--output-dir", str(tmp_path / "linear")]
    linear_eval.main(evaluate + ["--knn"])
    stdout = capsys.readouterr().out
    assert "(module.encoder.)" in stdout and "module.target_encoder.*" in stdout and "=> kNN" in stdout
    linear_eval.main(evaluate + ["--epochs", "1", "--lr", "1.0"])
    assert "sanity check passed" in capsys.readouterr().out


@pytest.mark.slow
def test_two_process_run_with_torchrun(tmp_path):
    """The command line (the one start of this file): 2 ranks of 8 images a step, K counting global steps."""
    proc = run_script("byol.py", *TINY, "--epochs", "1", "--output-dir", tmp_path, nproc=2, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "=> creating model 'resnet18'" in proc.stdout and "Tau 0.99" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["method"] == "byol" and ckpt["epoch"] == 1 and ckpt["args"]["batch_size"] == 16
    assert proc.stdout.count(f"Epoch: [0][0/{STEPS}]") == 1  # only rank 0 prints
    assert ckpt["tau"] == pytest.approx(byol.target_tau(STEPS - 1, STEPS, 0.996), abs=1e-12)  # last of K steps


def test_paper_defaults():
    args = byol.parse_args(["--data", "synthetic"])
    assert (args.lr, args.wd, args.momentum, args.batch_size, args.epochs, args.warmup_epochs) == (0.2, 1.5e-6, 0.9, 4096, 300, 10)
    assert (args.tau_base, args.dim, args.hidden_dim, args.arch) == (0.996, 256, 4096, "resnet50")


def test_augmentations_are_asymmetric_as_table_6():
    args = byol.parse_args(["--data", "synthetic", "--image-size", "224"])
    views = byol.build_transform(args).views
    for t, (blur_p, solarize_p) in zip(views, [(1.0, 0.0), (0.1, 0.2)]):
        ops = {type(op).__name__: op for op in t.transforms}
        assert ops["RandomResizedCrop"].scale == (0.08, 1.0)
        blur = [op for op in t.transforms if isinstance(op, byol.transforms.RandomApply)
                and isinstance(op.transforms[0], byol.transforms.GaussianBlur)][0]
        assert blur.p == blur_p and blur.transforms[0].kernel_size == (23, 23)
        assert blur.transforms[0].sigma == (0.1, 2.0)
        assert ops["RandomSolarize"].p == solarize_p and ops["RandomSolarize"].threshold == 128
        assert ops["RandomGrayscale"].p == 0.2
    jitter = [op for op in views[0].transforms if isinstance(op, byol.transforms.RandomApply)][0]
    assert jitter.p == 0.8 and jitter.transforms[0].saturation == (0.8, 1.2) and jitter.transforms[0].hue == (-0.1, 0.1)
