"""SimCLR: NT-Xent against a brute-force loop, the gradient-carrying gather under DDP, LARS, the
per-step schedule, the lr scaling, the augmentation recipe, end to end (1 and 2 processes, resume, linear_eval.py
reading the checkpoint). Its errors are the scaffold's: tests/test_errors.py."""
import argparse
import contextlib
import io
import json
import math
import os
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision.transforms as transforms

import linear_eval
import simclr
from conftest import run_script

# the short run of simclr.py (tests/test_preemption.py, test_scaffold.py): 64 images of 16 px, global batch 16,
# 4 steps an epoch
TINY = ["--data", "synthetic:64", "-a", "resnet18", "-b", "16", "--image-size", "16", "--proj-out-dim", "16", "-j",
        "0", "--seed", "0", "-p", "2", "--warmup-epochs", "1", "--temperature", "0.5"]
TINY += ["--stem", "imagenet", "--knn-every", "0"]  # the CIFAR stem and the monitor: test_monitor.py


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """Two cores shared with other jobs: one intra-op thread, also for the module's shared run (conftest.one_thread
    is per test, set up after a module fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float):
    """Eq. (1) written out: views [z1; z2], anchor i's positive is the other view of its image, the
    denominator sums over every k ≠ i. Returns the official objective.py scale, the mean over the
    view-1 anchors plus the mean over the view-2 anchors (2 × Alg. 1's mean over all 2N), and, per
    anchor, whether the positive is the most similar candidate (acc@1 of the pretext task)."""
    views = torch.cat([z1, z2])
    two_n = views.shape[0]
    losses, hits = [], []
    for i in range(two_n):
        j = (i + two_n // 2) % two_n
        sim = [views[i] @ views[k] / (views[i].norm() * views[k].norm()) for k in range(two_n)]
        denominator = sum(torch.exp(sim[k] / tau) for k in range(two_n) if k != i)
        losses.append(-torch.log(torch.exp(sim[j] / tau) / denominator))
        hits.append(all(sim[j] > sim[k] for k in range(two_n) if k not in (i, j)))
    loss_a, loss_b = torch.stack(losses[:two_n // 2]).mean(), torch.stack(losses[two_n // 2:]).mean()
    return loss_a + loss_b, torch.tensor(hits, dtype=torch.float32).mean() * 100


# -------------------------------------------------------------------------------------- NT-Xent
def test_nt_xent_equals_a_brute_force_loop_over_anchors():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7) * 3, torch.randn(5, 7)  # not normalised: the loss must normalise
    z2[0] = z1[0] * 2 + 0.1  # a near-positive, so acc@1 is neither 0 nor 100 %
    loss, logits, labels = simclr.nt_xent_loss(z1, z2, 0.3)
    ref, ref_acc1 = brute_force_nt_xent(z1, z2, 0.3)
    torch.testing.assert_close(loss, ref)
    assert logits.shape == (10, 10)  # 2n anchors × 2N candidates
    acc1, acc5 = simclr.common.accuracy(logits, labels, topk=(1, 5))
    torch.testing.assert_close(acc1, ref_acc1)
    assert 0 < float(acc1) < 100 and float(acc5) >= float(acc1)
    assert torch.isinf(logits.diagonal()).all()  # an anchor is never its own candidate
    # τ matters and is not applied twice: τ → the brute force at another τ
    torch.testing.assert_close(simclr.nt_xent_loss(z1, z2, 0.7)[0], brute_force_nt_xent(z1, z2, 0.7)[0])


def test_nt_xent_has_the_official_scale_by_hand():
    """objective.py returns loss_a + loss_b, twice Alg. 1's mean over the 2N anchors. Two images,
    both views equal, the images orthogonal: every anchor sees its positive at cosine 1 and two
    negatives at 0, so each direction's mean is log(1 + 2·e^(−1/τ)) and the loss twice that. Equal
    views everywhere: chance, 2·log(2N − 1)."""
    tau = 0.5
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    loss = simclr.nt_xent_loss(z, z.clone(), tau)[0]
    assert float(loss) == pytest.approx(2 * math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-6)
    same = torch.ones(4, 3)
    assert float(simclr.nt_xent_loss(same, same, tau)[0]) == pytest.approx(2 * math.log(2 * 4 - 1), rel=1e-6)


def test_gather_with_grad_is_the_identity_without_a_process_group():
    x = torch.randn(4, 3, requires_grad=True)
    assert simclr.gather_with_grad(x) is x


# --------------------------------------------------------------------------- DDP gather with grad
class TinyNet(nn.Module):
    """Stands in for a torchvision ResNet (num_classes sets the output, `fc` is the head). No BN:
    every sample's embedding depends on that sample only, so the global-batch reference is exact."""

    def __init__(self, num_classes: int = 6, zero_init_residual: bool = False):  # no residual blocks
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def global_batch(N=8):
    torch.manual_seed(1)
    return torch.randn(N, 6), torch.randn(N, 6), torch.randn(N, 5), torch.randn(N, 5)


def _gather_worker(rank, world_size, out_dir):
    Z1, Z2, X1, X2 = global_batch()
    n = Z1.shape[0] // world_size
    mine = slice(rank * n, (rank + 1) * n)
    z1, z2 = Z1[mine].clone().requires_grad_(), Z2[mine].clone().requires_grad_()
    loss, _, _ = simclr.nt_xent_loss(z1, z2, 0.5)
    loss.backward()
    torch.manual_seed(2)  # same initial model on both ranks
    model = nn.parallel.DistributedDataParallel(simclr.SimCLR(TinyNet, dim=6))
    z1_model, z2_model = model(X1[mine], X2[mine])
    model_loss = simclr.nt_xent_loss(z1_model, z2_model, 0.5)[0]
    model_loss.backward()
    torch.save({"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad, "model_loss": model_loss.detach(),
                "param_grads": [p.grad for p in model.parameters()]}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
@pytest.mark.gloo_worker(worker=_gather_worker)
def test_ddp_loss_and_gradients_equal_one_process_holding_the_global_batch(gloo_dir):
    """Two gloo ranks each hold half of the global batch; the reference is the brute-force loss on
    the whole batch in this process.

    Each rank's loss is over its own anchors against all 2N candidates (mean per view, the two views
    summed), so the global loss L (the same over all 2N anchors) is the mean of the ranks' losses. DDP averages parameter
    gradients over the W ranks (a factor 1/W), so to give ∂L/∂θ each rank's gradient w.r.t. its
    own embeddings must be W·∂L/∂z_rank: the sum over ranks of ∂loss_r/∂z_rank, which is what the
    backward all-reduce of the gather produces. A gather without gradient leaves only the rank's
    own term ∂loss_rank/∂z_rank and fails both checks below."""
    W = 2  # the ranks of gloo_dir's group
    r0, r1 = (torch.load(gloo_dir / f"{r}.pt", weights_only=True) for r in (0, 1))
    Z1, Z2, X1, X2 = (t.clone().requires_grad_() for t in global_batch())
    ref = brute_force_nt_xent(Z1, Z2, 0.5)[0]
    ref.backward()
    torch.testing.assert_close((r0["loss"] + r1["loss"]) / W, ref.detach())
    torch.testing.assert_close(torch.cat([r0["g1"], r1["g1"]]) / W, Z1.grad)  # undo DDP's 1/W to come
    torch.testing.assert_close(torch.cat([r0["g2"], r1["g2"]]) / W, Z2.grad)
    # the real chain: SimCLR model under DDP; its averaged gradients are the global-batch gradients
    torch.manual_seed(2)
    model = simclr.SimCLR(TinyNet, dim=6)
    z1, z2 = model(X1.detach(), X2.detach())
    ref_model = brute_force_nt_xent(z1, z2, 0.5)[0]
    ref_model.backward()
    torch.testing.assert_close((r0["model_loss"] + r1["model_loss"]) / W, ref_model.detach())
    for p, g0, g1 in zip(model.parameters(), r0["param_grads"], r1["param_grads"]):
        torch.testing.assert_close(g0, p.grad)
        torch.testing.assert_close(g1, p.grad)


# ---------------------------------------------------------------------------------------- model
def test_every_residual_block_starts_as_the_identity():
    """Official resnet.py (init_zero=True): γ = 0 in the last BN of every residual block, basic
    (ResNet-18/34) and bottleneck (ResNet-50+) alike; every other BN keeps γ = 1."""
    for arch, last in (("resnet18", "bn2"), ("resnet50", "bn3")):
        encoder = simclr.SimCLR(simclr.models.__dict__[arch], 16).encoder
        blocks = [block for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4) for block in layer]
        assert all(torch.all(getattr(block, last).weight == 0) for block in blocks)
        others = [m.weight for name, m in encoder.named_modules()
                  if isinstance(m, nn.BatchNorm2d) and not name.endswith(last)]
        assert others and all(torch.all(w == 1) for w in others)


# ----------------------------------------------------------------------------------------- LARS
def lars_by_hand(lrs, classic: bool, wd=0.1, eta=0.01, m=0.9):
    """Three LARS steps written out for one adapted weight w and one excluded bias b, gradients fixed
    per step. classic: the official SimCLR lars_optimizer.py, v ← m·v + lr·trust·(g + λw), w ← w − v.
    Otherwise (linear_eval.py's larc_ then SGD, apex LARC; byol.py; optax in the official BYOL):
    v ← m·v + trust·(g + λw), w ← w − lr·v. Trust η‖w‖/‖g + λw‖ (You et al. Alg. 1); the bias gets trust 1 and no decay."""
    w, b = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([1.0, -2.0])
    v_w, v_b = torch.zeros(2, 2), torch.zeros(2)
    for step, lr in enumerate(lrs):
        g_w, g_b = lars_gradients(step)
        d = g_w + wd * w
        u_w = eta * w.norm() / d.norm() * d
        if classic:
            v_w, v_b = m * v_w + lr * u_w, m * v_b + lr * g_b
            w, b = w - v_w, b - v_b
        else:
            v_w, v_b = m * v_w + u_w, m * v_b + g_b
            w, b = w - lr * v_w, b - lr * v_b
    return w, b


def lars_gradients(step: int):
    return torch.tensor([[1.0, -2.0], [0.5, 3.0]]) * (step + 1), torch.tensor([0.5, 0.25]) / (step + 1)


def simclr_lars(w, b):
    """simclr.py: LARS, the bias in an excluded group (biases and BN, lars_param_groups)."""
    optimizer = simclr.LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}], 0.1,
                            momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    return optimizer, optimizer.step


def linear_eval_larc_then_sgd(w, b):
    """linear_eval.py --protocol simsiam: larc_ on the gradients (decay, trust ratio), then SGD without decay. larc_
    is given w only, so that b is the excluded bias of the by-hand steps (linear_eval.py adapts its bias too:
    tests/test_linear_eval.py)."""
    optimizer = torch.optim.SGD([w, b], 0.1, momentum=0.9)

    def step():
        linear_eval.larc_([w], weight_decay=0.1, trust=0.01)
        optimizer.step()
    return optimizer, step


@pytest.mark.parametrize("build, classic", [(simclr_lars, True), (linear_eval_larc_then_sgd, False)],
                         ids=["simclr.LARS", "linear_eval.larc_"])
def test_lars_trajectory_with_a_changing_lr_by_hand(build, classic):
    """simclr.py's LARS folds each step's lr into the momentum buffer as the official SimCLR code;
    linear_eval.py's larc_ + SGD (apex LARC, as byol.py's LARS) multiplies the buffer by the current lr, as the
    official BYOL optax code. Same steps at a constant lr, different ones while the lr changes."""
    lrs = [0.1, 0.2, 0.3]
    w, b = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]])), nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer, step_fn = build(w, b)
    for step, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        w.grad, b.grad = lars_gradients(step)
        step_fn()
    w_ref, b_ref = lars_by_hand(lrs, classic)
    torch.testing.assert_close(w.detach(), w_ref)
    torch.testing.assert_close(b.detach(), b_ref)
    w_other, b_other = lars_by_hand(lrs, not classic)  # the other form is measurably elsewhere
    assert (w_other - w_ref).abs().max() > 1e-4 and (b_other - b_ref).abs().max() > 1e-2
    for got, want in zip(lars_by_hand([0.2] * 3, True), lars_by_hand([0.2] * 3, False)):
        torch.testing.assert_close(got, want)  # at a constant lr both forms agree


def test_lars_groups_exclude_every_bias_and_bn_parameter():
    model = simclr.SimCLR(simclr.models.resnet18, 16)
    groups = simclr.lars_param_groups(model)
    normal, excluded = groups[0]["params"], groups[1]["params"]
    assert groups[1]["lars_exclude"] and groups[1]["weight_decay"] == 0.0 and "lars_exclude" not in groups[0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(map(id, normal + excluded)) == sorted(map(id, model.parameters()))  # each exactly once
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in normal)
    assert {names[id(p)] for p in excluded} == {n for n, p in model.named_parameters()
                                                if n.endswith("bias") or ".bn" in n or "downsample.1" in n}
    assert "encoder.fc.0.bias" in {names[id(p)] for p in excluded}


# ------------------------------------------------------------------------------------ schedule
def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    args = argparse.Namespace(init_lr=2.0, warmup_epochs=4, epochs=10)
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]},
                                 {"params": [nn.Parameter(torch.zeros(1))]}], lr=123.0)

    def lr_at(epoch):
        simclr.adjust_learning_rate(optimizer, epoch, args)
        assert optimizer.param_groups[0]["lr"] == optimizer.param_groups[1]["lr"]
        return optimizer.param_groups[0]["lr"]

    assert lr_at(0) == 0.0
    assert lr_at(1.5) == pytest.approx(2.0 * 1.5 / 4)  # fractional epochs: per step
    assert lr_at(4 - 1e-9) == pytest.approx(2.0)
    assert lr_at(4) == pytest.approx(2.0)  # the end of warm-up reaches init_lr
    assert lr_at(7) == pytest.approx(1.0)  # half-way through the cosine
    assert lr_at(5.5) == pytest.approx(1.0 * (1 + math.cos(math.pi * 1.5 / 6)))
    assert lr_at(10) == pytest.approx(0.0, abs=1e-12)
    after = [lr_at(4 + k * 0.25) for k in range(25)]
    assert all(a > b for a, b in zip(after, after[1:]))


# -------------------------------------------------------------------------------- augmentation
def test_augmentation_is_the_app_a_recipe():
    args = simclr.parse_args(["--data", "synthetic", "--image-size", "224", "--color-jitter-strength", "0.5"])
    views = simclr.build_transform(args).views
    assert len(views) == 2 and views[0] is views[1]
    ops = views[0].transforms
    crop, jitter, gray, blur = ops[0], ops[2], ops[3], ops[4]
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.scale == (0.08, 1.0) and crop.size == (224, 224)
    assert isinstance(ops[1], transforms.RandomHorizontalFlip)
    assert jitter.p == 0.8 and jitter.transforms[0].brightness == (0.6, 1.4)  # 0.8·s with s = 0.5
    assert jitter.transforms[0].hue == (-0.1, 0.1)  # 0.2·s
    assert isinstance(gray, transforms.RandomGrayscale) and gray.p == 0.2
    assert blur.p == 0.5 and blur.transforms[0].kernel_size == (23, 23) and blur.transforms[0].sigma == (0.1, 2.0)
    small = simclr.build_transform(simclr.parse_args(["--data", "synthetic"])).views[0].transforms
    assert small[4].transforms[0].kernel_size == (3, 3)  # 10 % of 32 px, odd


def test_docs_cifar10_row_is_the_official_command():
    """google-research/simclr README, CIFAR-10 on one GPU: batch 512, 1000 epochs, lr 1.0, weight decay
    1e-4 (1e-6 only in the README of March 2020), τ 0.5, jitter strength 0.5, no blur. The row is in
    docs/simclr.md, "Flags for the paper's settings"."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "simclr.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| CIFAR-10 (App. B.9; official README command)"))
    args = simclr.parse_args(shlex.split(row.split("`")[1]))
    assert (args.data, args.arch, args.batch_size, args.epochs, args.lr, args.wd, args.temperature,
            args.color_jitter_strength, args.blur_kernel) == ("cifar10", "resnet18", 512, 1000, 1.0, 1e-4, 0.5, 0.5, 0.0)


# ---------------------------------------------------------------------------------- end to end
def load(folder):
    return torch.load(folder / "checkpoint.pth.tar", weights_only=True)


@pytest.mark.parametrize("scaling, lr, init_lr", [("linear", 0.3, 0.3 * 16 / 256), ("sqrt", 0.075, 0.075 * 4)])
def test_lr_scaling_is_sec_2_3_or_app_b1(scaling, lr, init_lr, tmp_path, monkeypatch):
    """Sec. 2.3: init_lr = lr × batch/256; App. B.1: lr × √batch, the official `learning_rate_scaling` sqrt; from
    the global batch 16. The epoch is stubbed: what main() hands the optimizer and the schedule is under test."""
    seen = {}

    def record(loader, model, optimizer, epoch, args, run):
        seen.update(init_lr=args.init_lr, optimizer=optimizer.defaults["lr"])
        return {"epoch": epoch}
    monkeypatch.setattr(simclr, "train_one_epoch", record)
    with contextlib.redirect_stdout(io.StringIO()):
        simclr.main(TINY + ["--epochs", "1", "--lr-scaling", scaling, "--lr", str(lr), "--output-dir", str(tmp_path)])
    assert seen == {"init_lr": pytest.approx(init_lr, rel=1e-12), "optimizer": pytest.approx(init_lr, rel=1e-12)}
    assert load(tmp_path)["args"]["init_lr"] == pytest.approx(init_lr, rel=1e-12)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """1 epoch, then --resume auto to epoch 2, in this process (a failure raises SystemExit here): the folder and
    the two runs' stdout."""
    out = tmp_path_factory.mktemp("simclr")
    with contextlib.redirect_stdout(io.StringIO()) as first:
        simclr.main(TINY + ["--epochs", "1", "--output-dir", str(out)])
    with contextlib.redirect_stdout(io.StringIO()) as second:
        simclr.main(TINY + ["--epochs", "2", "--output-dir", str(out), "--resume", "auto"])
    return out, first.getvalue(), second.getvalue()


@pytest.mark.slow
def test_one_process_run_checkpoint_and_resume(pretrained):
    out, first, second = pretrained
    assert "=> creating model 'resnet18'" in first and "Acc@1" in first and "Acc@5" in first
    assert f"=> loaded checkpoint '{out / 'checkpoint.pth.tar'}' (epoch 1)" in second
    assert "Epoch: [1][0/4]" in second and "Epoch: [0]" not in second
    ckpt = load(out)
    assert (ckpt["method"], ckpt["arch"], ckpt["epoch"], ckpt["step"]) == ("simclr", "resnet18", 2, 0)
    assert all(k.startswith("module.encoder.") for k in ckpt["state_dict"])
    assert ckpt["state_dict"]["module.encoder.fc.0.weight"].shape == (512, 512)  # g: 512-512-16
    assert ckpt["state_dict"]["module.encoder.fc.2.weight"].shape == (16, 512)
    # the lr is set per step: the last of 4 steps of epoch 0 is 3/4 into the 1-epoch warm-up
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    init_lr = 0.3 * 16 / 256
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert log[0]["lr"] == pytest.approx(init_lr * 0.75)
    assert log[1]["lr"] == pytest.approx(init_lr * 0.5 * (1 + math.cos(math.pi * 0.75)))


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_run(pretrained, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        simclr.main(TINY + ["--epochs", "2", "--output-dir", str(tmp_path)])
    a, b = load(tmp_path), load(pretrained[0])
    assert a["epoch"] == b["epoch"] == 2 and a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # weights and BN statistics
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key in a["optimizer"]["state"]:  # LARS momentum buffers
        assert torch.equal(a["optimizer"]["state"][key]["momentum_buffer"],
                           b["optimizer"]["state"][key]["momentum_buffer"])


@pytest.mark.slow
def test_two_process_run_with_torchrun(tmp_path):
    proc = run_script("simclr.py", *TINY, "--data", "synthetic:32", "--epochs", "1", "--output-dir", tmp_path, nproc=2,
                      timeout=90, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    ckpt = load(tmp_path)
    assert ckpt["epoch"] == 1 and ckpt["args"]["batch_size"] == 16
    assert ckpt["args"]["init_lr"] == pytest.approx(0.3 * 16 / 256)  # from the global batch, not the per-process 8
    assert all(k.startswith("module.encoder.") for k in ckpt["state_dict"])
    # 32 images, global batch 16: 2 steps of 8 images per rank; only rank 0 prints
    assert proc.stdout.count("Epoch: [0][0/2]") == 1 and proc.stdout.count("Epoch: [0][1/2]") == 1
    done = f"=> done: epoch 1 of 1; checkpoint '{tmp_path / 'checkpoint.pth.tar'}'"
    assert proc.stdout.strip().splitlines()[-1] == done


@pytest.mark.slow
def test_linear_eval_reads_the_checkpoint(pretrained, tmp_path, capsys):
    path = str(pretrained[0] / "checkpoint.pth.tar")
    knn = linear_eval.main(["--data", "synthetic:64", "--pretrained", path, "-b", "16", "--image-size", "16", "-j", "0",
                            "--seed", "0", "--output-dir", str(tmp_path), "--knn"])
    assert 0.0 <= knn["knn_acc1"] <= 100.0
    out = capsys.readouterr().out
    assert "SimCLR" in out and "arch resnet18" in out and "ignored 4" in out  # the head g (fc.0, fc.2) is dropped
    backbone, _ = linear_eval.load_backbone(path, None, "auto")
    state = torch.load(path, weights_only=True)["state_dict"]
    for key, value in backbone.state_dict().items():  # the encoder f without g, bit for bit
        assert torch.equal(value, state["module." + key]), key
