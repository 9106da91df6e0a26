"""CMC: colour conversions, NCE and softmax losses, Z, cross-view banks, memory update, DDP banks, end to end (runs in
this process, their resume and linear_eval; the command line under torchrun), its own start-up error (the shared ones:
test_errors.py)."""
import contextlib
import io
import os
import re
import shlex
import shutil
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cmc
import common
import linear_eval
from conftest import ddp, run_script

TINY = ["--data", "synthetic:64", "-a", "resnet18", "-b", "32", "--nce-k", "16", "--image-size", "8", "-j", "0",
        "--seed", "0", "-p", "2"]  # 2 steps an epoch
TINY += ["--stem", "imagenet", "--knn-every", "0"]  # the CIFAR stem and the monitor: test_monitor.py


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """Stands in for a torchvision ResNet: `num_classes` sets the output, `conv1` is replaced by CMC,
    `fc` is the head."""

    def __init__(self, num_classes: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.body = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.body(self.conv1(x)))


def tiny_cmc(n_data=20, K=5, T=0.1, m=0.5, softmax=False, seed=0):
    torch.manual_seed(seed)
    return cmc.CMC(TinyNet, n_data, dim=8, K=K, T=T, m=m, softmax=softmax)


def features(model, x):
    """The two views' L2-normalised features, computed here from the encoders directly."""
    return F.normalize(model.encoder_l(x[:, :1]), dim=1), F.normalize(model.encoder_ab(x[:, 1:]), dim=1)


# --------------------------------------------------------------------------- colour conversions
# sRGB (D65) → CIE L*a*b*, reference values of the standard sRGB/Lab definitions (e.g. Lindbloom's
# and EasyRGB's calculators): white (100, 0, 0), red (53.24, 80.09, 67.20), ...
LAB_REFERENCE = [
    ((255, 255, 255), (100.00, 0.00, 0.00)),
    ((0, 0, 0), (0.00, 0.00, 0.00)),
    ((255, 0, 0), (53.24, 80.09, 67.20)),
    ((0, 255, 0), (87.73, -86.18, 83.18)),
    ((0, 0, 255), (32.30, 79.19, -107.86)),
    ((128, 128, 128), (53.59, 0.00, 0.00)),
]
# RGB → YCbCr, BT.601 studio range as skimage.color.rgb2ycbcr (the official CMC conversion), with
# R, G, B in [0, 1]: Y = 16 + 65.481R + 128.553G + 24.966B, Cb = 128 − 37.797R − 74.203G + 112B,
# Cr = 128 + 112R − 93.786G − 18.214B; white (235, 128, 128), black (16, 128, 128)
YCBCR_REFERENCE = [
    ((255, 255, 255), (235.0, 128.0, 128.0)),
    ((0, 0, 0), (16.0, 128.0, 128.0)),
    ((255, 0, 0), (81.481, 90.203, 240.0)),
    ((0, 255, 0), (144.553, 53.797, 34.214)),
    ((0, 0, 255), (40.966, 240.0, 109.786)),
    ((128, 128, 128), (125.93, 128.0, 128.0)),
]


@pytest.mark.parametrize("rgb, lab", LAB_REFERENCE)
def test_rgb_to_lab_matches_reference_colours(rgb, lab):
    image = (torch.tensor(rgb, dtype=torch.float32) / 255).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(common.rgb_to_lab(image)[:, 0, 0], torch.tensor(lab), atol=0.5, rtol=0)


@pytest.mark.parametrize("rgb, ycbcr", YCBCR_REFERENCE)
def test_rgb_to_ycbcr_matches_reference_colours(rgb, ycbcr):
    image = (torch.tensor(rgb, dtype=torch.float32) / 255).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(common.rgb_to_ycbcr(image)[:, 0, 0], torch.tensor(ycbcr), atol=0.5, rtol=0)


def test_official_normalisation_maps_the_lab_gamut_onto_minus_1_to_1():
    """train_CMC.py l. 132–137: Lab mean ((0+100)/2, (−86.183+98.233)/2, (−107.857+94.478)/2), std
    ((100−0)/2, (86.183+98.233)/2, (107.857+94.478)/2), i.e. L, a, b from their sRGB ranges to
    [−1, 1]: black and white are L −1 and +1, green and magenta a −1 and +1, blue and yellow b −1 and
    +1. YCbCr: the official constants as they stand."""
    mean, std = common.ToColorSpace.STATS["Lab"]
    assert mean == pytest.approx(((0 + 100) / 2, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2))
    assert std == pytest.approx(((100 - 0) / 2, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2))
    assert common.ToColorSpace.STATS["YCbCr"] == ((116.151, 121.080, 132.342), (109.500, 111.855, 111.964))
    to_lab = common.ToColorSpace("Lab")
    colour = lambda rgb: to_lab(torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1))[:, 0, 0]  # noqa: E731
    for rgb, channel, end in [((0, 0, 0), 0, -1), ((1, 1, 1), 0, 1), ((0, 1, 0), 1, -1), ((1, 0, 1), 1, 1),
                              ((0, 0, 1), 2, -1), ((1, 1, 0), 2, 1)]:
        assert float(colour(rgb)[channel]) == pytest.approx(end, abs=1e-3), (rgb, channel)


def test_transform_puts_lightness_in_channel_0_and_colour_in_1_2():
    """The model splits x[:, :1] / x[:, 1:]: a grey image has a, b = 0, i.e. the constant −mean/std
    after normalisation, and only L varies."""
    args = cmc.parse_args(["--data", "synthetic", "--image-size", "8"])
    grey = common.ToColorSpace("Lab")(torch.stack([torch.full((3, 8, 8), 0.7), torch.full((3, 8, 8), 0.2)]))
    (_, a_mean, b_mean), (_, a_std, b_std) = common.ToColorSpace.STATS["Lab"]
    expected = torch.tensor([-a_mean / a_std, -b_mean / b_std]).view(1, 2, 1, 1).expand(2, 2, 8, 8)
    torch.testing.assert_close(grey[:, 1:], expected, atol=1e-4, rtol=0)
    assert (grey[0, 0] - grey[1, 0]).abs().min() > 0.1
    from PIL import Image
    x = cmc.build_transform(args)(Image.new("RGB", (16, 16), (200, 30, 30)))
    assert x.shape == (3, 8, 8)


def test_imagenet_commands_crop_from_8_percent_as_the_official_script():
    """train_CMC.py l. 95–97: with --dataset imagenet every ResNet crops from 8 % of the area; its
    default (ours too) is 20 %. Every ImageNet command in the docstring, README and docs/cmc.md says 0.08."""
    root = Path(__file__).resolve().parents[1]
    docs = (root / "README.md").read_text() + (root / "docs" / "cmc.md").read_text()
    lines = [line for line in (cmc.__doc__ + docs).splitlines() if re.search(r"cmc\.py (--data )?/imagenet", line)]
    assert len(lines) == 5  # 2 in the docstring, 3 in docs/cmc.md
    for line in lines:  # [optional flags] of the docstring taken as given
        args = cmc.parse_args(shlex.split(re.sub(r"[][]", "", line.split("cmc.py", 1)[1].split("#")[0])))
        assert args.data == "/imagenet" and args.crop_min == 0.08, line
    assert cmc.parse_args(["--data", "synthetic"]).crop_min == 0.2


# --------------------------------------------------------------------------------------- losses
def test_nce_loss_matches_closed_form():
    n_data, K = 50, 3
    P = torch.tensor([[0.30, 0.01, 0.02, 0.05], [0.02, 0.10, 0.001, 0.03]])
    Pn = 1 / n_data
    h_pos = P[:, 0] / (P[:, 0] + K * Pn)  # posterior of "data" for the positive
    one_minus_h_noise = (K * Pn) / (P[:, 1:] + K * Pn)
    closed = -(h_pos.log() + one_minus_h_noise.log().sum(1)).mean()
    torch.testing.assert_close(cmc.nce_loss(P, n_data), closed, rtol=1e-5, atol=1e-6)
    swapped = P[:, [1, 0, 2, 3]]  # the positive must be column 0
    assert not torch.allclose(cmc.nce_loss(swapped, n_data), closed)


def test_softmax_loss_is_cross_entropy_with_label_0():
    s_l, s_ab = torch.randn(4, 6) * 3, torch.randn(4, 6) * 3
    loss, l_p, ab_p = cmc.cmc_loss(s_l, s_ab, n_data=100, softmax=True)
    closed = -(s_l[:, 0].exp() / s_l.exp().sum(1)).log().mean() - (s_ab[:, 0].exp() / s_ab.exp().sum(1)).log().mean()
    torch.testing.assert_close(loss, closed)
    torch.testing.assert_close(l_p, (s_l[:, 0].exp() / s_l.exp().sum(1)).mean())
    torch.testing.assert_close(ab_p, (s_ab[:, 0].exp() / s_ab.exp().sum(1)).mean())


def test_nce_mode_sums_both_directions_and_reports_column_0():
    P_l, P_ab = torch.rand(4, 6) * 0.1, torch.rand(4, 6) * 0.1
    loss, l_p, ab_p = cmc.cmc_loss(P_l, P_ab, n_data=30, softmax=False)
    torch.testing.assert_close(loss, cmc.nce_loss(P_l, 30) + cmc.nce_loss(P_ab, 30))
    torch.testing.assert_close(l_p, P_l[:, 0].mean())
    torch.testing.assert_close(ab_p, P_ab[:, 0].mean())


# --------------------------------------------------------------------------- banks and scores
def test_cross_view_pairing_and_the_positive_is_the_own_bank_row():
    model = tiny_cmc(n_data=20, K=5, T=0.1, softmax=True).eval()
    x, index = torch.randn(4, 3, 12, 12), torch.tensor([3, 7, 11, 19])
    s_l, s_ab, f_l, f_ab = model(x, index)
    ref_l, ref_ab = features(model, x)
    torch.testing.assert_close(f_l, ref_l)
    torch.testing.assert_close(f_ab, ref_ab)
    assert s_l.shape == s_ab.shape == (4, 6)
    # column 0: view l against bank ab at the image's own row, view ab against bank l
    torch.testing.assert_close(s_l[:, 0], (model.memory_ab[index] * ref_l).sum(1) / 0.1)
    torch.testing.assert_close(s_ab[:, 0], (model.memory_l[index] * ref_ab).sum(1) / 0.1)
    assert not torch.allclose(s_l[:, 0], (model.memory_l[index] * ref_l).sum(1) / 0.1)  # not the same view's bank
    # columns 1..K: scores against rows of the other view's bank
    all_l = ref_l @ model.memory_ab.t() / 0.1  # 4×N
    all_ab = ref_ab @ model.memory_l.t() / 0.1
    for scores, every_row in ((s_l, all_l), (s_ab, all_ab)):
        match = (scores[:, 1:, None] - every_row[:, None, :]).abs() < 1e-5  # 4×K×N
        assert match.any(-1).all()


def test_swapped_banks_are_detected():
    """Banks filled with two constant rows u (l) and w (ab): s_l must be f_l·w/τ, s_ab f_ab·u/τ everywhere."""
    model = tiny_cmc(softmax=True).eval()
    u, w = F.normalize(torch.randn(8), dim=0), F.normalize(torch.randn(8), dim=0)
    model.memory_l.copy_(u.expand(20, 8)), model.memory_ab.copy_(w.expand(20, 8))
    x = torch.randn(3, 3, 12, 12)
    s_l, s_ab, _, _ = model(x, torch.tensor([0, 1, 2]))
    ref_l, ref_ab = features(model, x)
    torch.testing.assert_close(s_l, (ref_l @ w / 0.1)[:, None].expand(3, 6))
    torch.testing.assert_close(s_ab, (ref_ab @ u / 0.1)[:, None].expand(3, 6))


def test_z_is_set_once_from_the_first_batch_then_fixed_and_restored_on_resume():
    model = tiny_cmc(n_data=20, K=5, T=0.1).eval()
    assert float(model.Z_l) == float(model.Z_ab) == -1.0
    x1, index = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    P_l, P_ab, _, _ = model(x1, index)
    f_l, f_ab = features(model, x1)
    # P = exp(s)/Z with Z = N·mean(exp(s)) per view: the mean of P over the first batch is exactly 1/N
    torch.testing.assert_close(P_l.mean(), torch.tensor(1 / 20))
    torch.testing.assert_close(P_ab.mean(), torch.tensor(1 / 20))
    torch.testing.assert_close(P_l[:, 0] * model.Z_l, ((model.memory_ab[index] * f_l).sum(1) / 0.1).exp())
    torch.testing.assert_close(P_ab[:, 0] * model.Z_ab, ((model.memory_l[index] * f_ab).sum(1) / 0.1).exp())
    Z_l, Z_ab = model.Z_l.clone(), model.Z_ab.clone()
    assert not torch.allclose(Z_l, Z_ab)  # one constant per view
    x2 = torch.randn(4, 3, 12, 12) * 3
    P_l2, _, _, _ = model(x2, index)
    assert torch.equal(model.Z_l, Z_l) and torch.equal(model.Z_ab, Z_ab)  # not re-estimated
    assert not torch.allclose(P_l2.mean(), torch.tensor(1 / 20))
    resumed = tiny_cmc(n_data=20, K=5, T=0.1, seed=5).eval()
    resumed.load_state_dict(model.state_dict())
    resumed(x2, index)
    assert torch.equal(resumed.Z_l, Z_l) and torch.equal(resumed.Z_ab, Z_ab)  # the checkpoint's Z is kept


def test_memory_update_closed_form_on_the_batch_rows_only():
    model = tiny_cmc(n_data=20, m=0.3)
    before_l, before_ab = model.memory_l.clone(), model.memory_ab.clone()
    index = torch.tensor([2, 5, 17])
    f_l, f_ab = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    model._update_memory(index, f_l, f_ab)
    for bank, old, f in ((model.memory_l, before_l, f_l), (model.memory_ab, before_ab, f_ab)):
        mixed = 0.3 * old[index] + 0.7 * f
        torch.testing.assert_close(bank[index], mixed / mixed.norm(dim=1, keepdim=True))
        others = torch.ones(20, dtype=torch.bool)
        others[index] = False
        assert torch.equal(bank[others], old[others])


def test_positive_is_column_0_for_every_draw():
    model = tiny_cmc(n_data=20, K=5, softmax=True).eval()
    model.memory_ab.copy_(F.normalize(torch.randn(20, 8), dim=1))
    x, index = torch.randn(4, 3, 12, 12), torch.tensor([9, 0, 19, 4])
    f_l, _ = features(model, x)
    for seed in range(5):
        torch.manual_seed(seed)
        s_l, _, _, _ = model(x, index)
        torch.testing.assert_close(s_l[:, 0], (model.memory_ab[index] * f_l).sum(1) / 0.1)


# ------------------------------------------------------------------------------------------ DDP
def test_bank_init_features_fills_each_bank_with_its_own_views_initial_feature():
    """--bank-init features: row i of bank l ← normalise(encoder_l(L of image i)), of bank ab ←
    normalise(encoder_ab(ab of image i)): not swapped (the loss pairs them across views)."""
    model = tiny_cmc(n_data=16).train()
    images = torch.randn(16, 3, 8, 8)
    batches = [(images[i:i + 4], torch.zeros(4), torch.arange(i, i + 4)) for i in range(0, 16, 4)]
    cmc.fill_banks(model, batches, torch.device("cpu"))
    with torch.no_grad():
        l, ab = zip(*(features(model, images[i:i + 4]) for i in range(0, 16, 4)))
    torch.testing.assert_close(model.memory_l, torch.cat(l))
    torch.testing.assert_close(model.memory_ab, torch.cat(ab))


def _bank_step_worker(rank, world_size, out_dir):
    model = tiny_cmc(n_data=16, K=5, T=0.1, seed=rank)  # as a run without --seed: DDP syncs the weights,
    before = {"memory_l": model.memory_l.clone(), "memory_ab": model.memory_ab.clone()}  # but not the banks
    wrapped = ddp(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # each rank has its own images, indices and noise draws
    x, index = torch.randn(4, 3, 12, 12), torch.arange(4) + 6 * rank  # rows 0-3 and 6-9
    out_l, out_ab, f_l, f_ab = wrapped(x, index)
    loss, _, _ = cmc.cmc_loss(out_l, out_ab, 16, softmax=False)
    loss.backward()
    optimizer.step()
    model._update_memory(index, f_l, f_ab)
    torch.save({"memory_l": model.memory_l, "memory_ab": model.memory_ab, "Z_l": model.Z_l, "Z_ab": model.Z_ab,
                "out_l": out_l.detach(), "out_ab": out_ab.detach(), "f_l": f_l, "f_ab": f_ab, "index": index,
                "before": before}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
@pytest.mark.gloo_worker(worker=_bank_step_worker)
def test_two_ranks_hold_identical_banks_and_z_with_both_ranks_updates(gloo_dir):
    r0, r1 = (torch.load(gloo_dir / f"{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("memory_l", "memory_ab"):  # same initial banks although the ranks were seeded differently
        assert torch.equal(r0["before"][key], r1["before"][key]), key
    for key in ("memory_l", "memory_ab", "Z_l", "Z_ab"):
        assert torch.equal(r0[key], r1[key]), key
    # Z from the mean over both ranks' batches: the global mean of P is 1/N, each rank's alone is not
    for key in ("out_l", "out_ab"):
        torch.testing.assert_close(torch.cat([r0[key], r1[key]]).mean(), torch.tensor(1 / 16))
        assert not torch.allclose(r0[key].mean(), torch.tensor(1 / 16))
    touched = torch.zeros(16, dtype=torch.bool)
    for r in (r0, r1):  # each rank's images updated with that rank's features, on both ranks
        for bank, f in (("memory_l", "f_l"), ("memory_ab", "f_ab")):
            mixed = 0.5 * r0["before"][bank][r["index"]] + 0.5 * r[f]
            torch.testing.assert_close(r0[bank][r["index"]], mixed / mixed.norm(dim=1, keepdim=True))
        touched[r["index"]] = True
    for bank in ("memory_l", "memory_ab"):
        assert torch.equal(r0[bank][~touched], r0["before"][bank][~touched])


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """In this process, at one thread, with --bank-init features (the banks are filled once, at the start, never on
    resume): a 2-epoch run straight through, a copy of its checkpoint after epoch 1 (the file a run killed then
    leaves), and that copy resumed with --resume auto; the resume's stdout."""
    root, threads = tmp_path_factory.mktemp("cmc"), torch.get_num_threads()
    straight, split = root / "straight", root / "split"
    split.mkdir()
    argv = TINY + ["--bank-init", "features", "--epochs", "2"]
    save = cmc.save_checkpoint

    def save_and_copy_epoch_1(state, path):
        save(state, path)
        if (state["epoch"], state["step"]) == (1, 0):
            shutil.copy(path, split / "checkpoint.pth.tar")

    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
            patch.setattr(cmc, "save_checkpoint", save_and_copy_epoch_1)
            cmc.main(argv + ["--output-dir", str(straight)])
        epoch_1 = torch.load(split / "checkpoint.pth.tar", weights_only=True)
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            cmc.main(argv + ["--output-dir", str(split), "--resume", "auto"])
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(straight=straight, split=split, epoch_1=epoch_1, resumed_stdout=stdout.getvalue())


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_run(runs):
    out = runs.resumed_stdout
    assert "(epoch 1)" in out and "Epoch: [1]" in out and "Epoch: [0]" not in out and "l_p" in out and "ab_p" in out
    a, b = (torch.load(d / "checkpoint.pth.tar", weights_only=True) for d in (runs.straight, runs.split))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # both encoders, BN statistics, both banks, both Z
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    for bank, Z in (("module.memory_l", "module.Z_l"), ("module.memory_ab", "module.Z_ab")):
        assert not torch.equal(runs.epoch_1["state_dict"][bank], a["state_dict"][bank])  # epoch 1 moved the bank
        assert torch.equal(runs.epoch_1["state_dict"][Z], a["state_dict"][Z])  # and kept epoch 0's first Z


@pytest.mark.slow
def test_checkpoint_and_linear_probe(runs, tmp_path, capsys):
    ckpt = torch.load(runs.straight / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["method"] == "cmc" and ckpt["arch"] == "resnet18" and ckpt["args"]["view"] == "Lab"
    state = ckpt["state_dict"]
    assert all(k.startswith(("module.encoder_l.", "module.encoder_ab.", "module.memory_", "module.Z_")) for k in state)
    assert state["module.encoder_l.conv1.weight"].shape == (64, 1, 7, 7)
    assert state["module.encoder_ab.conv1.weight"].shape == (64, 2, 7, 7)
    assert state["module.memory_l"].shape == state["module.memory_ab"].shape == (64, 128)
    assert float(state["module.Z_l"]) > 0 and float(state["module.Z_ab"]) > 0
    for bank in ("module.memory_l", "module.memory_ab"):
        torch.testing.assert_close(state[bank].norm(dim=1), torch.ones(64))

    pretrained = str(runs.straight / "checkpoint.pth.tar")
    linear_eval.main(["--data", "synthetic:64", "--image-size", "8", "-b", "32", "-j", "0", "--epochs", "1",
                      "--seed", "0", "--pretrained", pretrained, "--output-dir", str(tmp_path / "linear")])
    out = capsys.readouterr().out
    assert "CMC (Lab)" in out and "module.encoder_l., module.encoder_ab." in out and "sanity check passed" in out
    classifier = torch.load(tmp_path / "linear" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert classifier["module.weight"].shape == (10, 2 * 512)  # both encoders' features, concatenated
    with pytest.raises(SystemExit) as err:  # --export writes one torchvision ResNet: refused, nothing written
        linear_eval.main(["--data", "synthetic:64", "--pretrained", pretrained, "--export", str(tmp_path / "r18.pth"),
                          "--output-dir", str(tmp_path / "export")])
    assert str(err.value) == "linear_eval.py: --export writes one ResNet; a CMC checkpoint holds two encoders"
    assert not (tmp_path / "r18.pth").exists()


@pytest.mark.slow
def test_two_process_run_with_torchrun(tmp_path):
    """The command line (the one start of this file): 2 ranks, both Z estimated, rank 0 prints."""
    proc = run_script("cmc.py", *TINY, "--epochs", "1", "--output-dir", tmp_path, nproc=2, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "=> creating model 'resnet18'" in proc.stdout and "l_p" in proc.stdout and "ab_p" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["method"] == "cmc" and ckpt["epoch"] == 1 and ckpt["args"]["batch_size"] == 32
    # 64 images, global batch 32: 2 steps of 16 images per rank; only rank 0 prints
    assert proc.stdout.count("Epoch: [0][0/2]") == 1
    assert float(ckpt["state_dict"]["module.Z_l"]) > 0 and float(ckpt["state_dict"]["module.Z_ab"]) > 0


@pytest.mark.slow
def test_ycbcr_softmax_run_and_knn(tmp_path, capsys):
    cmc.main(TINY + ["--epochs", "1", "--view", "YCbCr", "--softmax", "--output-dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["args"]["view"] == "YCbCr" and ckpt["args"]["softmax"]
    assert float(ckpt["state_dict"]["module.Z_l"]) == float(ckpt["state_dict"]["module.Z_ab"]) == -1.0  # no Z
    capsys.readouterr()  # linear_eval.py in this process (its command line: test_linear_eval.py)
    linear_eval.main(["--data", "synthetic:64", "--image-size", "8", "--knn", "-b", "32", "-j", "0",
                      "--pretrained", str(tmp_path / "checkpoint.pth.tar"), "--output-dir", str(tmp_path / "knn")])
    stdout = capsys.readouterr().out
    assert "CMC (YCbCr)" in stdout and "=> kNN" in stdout


def test_underscore_aliases_of_the_official_flags():
    args = cmc.parse_args(["--data", "synthetic", "--nce_k", "16384", "--nce_t", "0.1", "--nce_m", "0.9",
                           "--feat_dim", "64", "--crop_low", "0.08"])
    assert (args.nce_k, args.nce_t, args.nce_m, args.feat_dim, args.crop_min) == (16384, 0.1, 0.9, 64, 0.08)
    args = cmc.parse_args(["/imagenet"])  # official paper defaults
    assert (args.data, args.nce_k, args.nce_t, args.nce_m, args.batch_size, args.lr, args.epochs, args.schedule,
            args.view, args.softmax) == ("/imagenet", 4096, 0.07, 0.5, 128, 0.03, 240, [120, 160, 200], "Lab", False)


# -------------------------------------------------------------------------------------- errors
def test_nce_k_must_be_smaller_than_the_banks(tmp_path):
    with pytest.raises(SystemExit) as err:
        cmc.main(["--data", "synthetic:64", "--nce-k", "64", "-a", "resnet18", "-b", "32", "-j", "0",
                  "--output-dir", str(tmp_path)])
    assert str(err.value) == "cmc.py: --nce-k 64 must be smaller than the memory bank (64 images in 'synthetic:64')"
