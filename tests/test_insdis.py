"""InsDis: NCE and softmax losses, Z, memory bank, positive row, 2-rank consistency, end to end (runs in this process,
their resume and linear_eval; the command line under torchrun), its own start-up error (the shared ones:
test_errors.py)."""
import contextlib
import io
import os
import shutil
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import insdis
import linear_eval
from conftest import ddp, run_script

TINY = ["--data", "synthetic:64", "-a", "resnet18", "-b", "32", "--nce-k", "32", "--image-size", "8", "-j", "0",
        "--seed", "0", "-p", "2"]  # 2 steps an epoch (tests/test_preemption.py runs it on 96 images: 3)
TINY += ["--stem", "imagenet", "--knn-every", "0"]  # the CIFAR stem and the monitor: test_monitor.py


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


def tiny_insdis(n_data=20, K=5, T=0.5, m=0.5, softmax=False, seed=0):
    torch.manual_seed(seed)
    return insdis.InsDis(TinyNet, n_data, dim=8, K=K, T=T, m=m, softmax=softmax).eval()


def by_hand_scores(model, x, index, seed):
    """The scores the brief prescribes: torch.randint(N, (B, K+1)) with column 0 the own index."""
    torch.manual_seed(seed)
    idx = torch.randint(model.n_data, (x.shape[0], model.K + 1))
    idx[:, 0] = index
    f = F.normalize(model.encoder(x), dim=1)
    return torch.stack([torch.stack([model.memory[j] @ f[b] for j in idx[b]]) for b in range(len(idx))]) / model.T


# ------------------------------------------------------------------------------------------ losses
def test_nce_loss_matches_closed_form():
    P = torch.tensor([[0.30, 0.01, 0.20], [0.05, 0.40, 0.002]])  # B=2, K=2, column 0 the positive
    n_data = 10
    Pn, K = 1 / n_data, 2
    expected = 0.0
    for row in P.tolist():
        h = [p / (p + K * Pn) for p in row]  # Eq. (6): posterior that the sample came from the data
        expected += -(torch.tensor(h[0]).log() + sum(torch.tensor(1 - x).log() for x in h[1:]))
    torch.testing.assert_close(insdis.nce_loss(P, n_data), expected / 2, atol=1e-5, rtol=1e-5)
    loss, prob = insdis.insdis_loss(P, torch.zeros(2, 8), torch.zeros(2, 8), n_data, softmax=False)
    torch.testing.assert_close(loss, expected / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prob, P[:, 0].mean())
    swapped = P[:, [1, 0, 2]]  # the positive must be column 0
    assert not torch.allclose(insdis.nce_loss(swapped, n_data), insdis.nce_loss(P, n_data))


def test_softmax_mode_returns_logits_and_the_loss_is_cross_entropy_with_label_0():
    model = tiny_insdis(softmax=True)
    x, index = torch.randn(4, 3, 6, 6), torch.tensor([1, 5, 9, 13])
    torch.manual_seed(7)
    out, f, v = model(x, index)
    s = by_hand_scores(model, x, index, seed=7)
    torch.testing.assert_close(out, s)
    assert float(model.Z) == -1.0  # the softmax needs no normalisation constant
    loss, prob = insdis.insdis_loss(out, f, v, model.n_data, softmax=True)
    log_p = s[:, 0] - s.exp().sum(1).log()  # −log exp(s_0)/Σ_j exp(s_j), by hand
    torch.testing.assert_close(loss, -log_p.mean())
    torch.testing.assert_close(prob, log_p.exp().mean())


def test_z_is_set_once_from_the_first_batch_then_fixed_and_restored_on_resume():
    model = tiny_insdis()
    x1, x2, index = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6) * 3, torch.tensor([0, 3, 6, 9])
    torch.manual_seed(1)
    out1, _, _ = model(x1, index)
    s1 = by_hand_scores(model, x1, index, seed=1)
    Z = model.n_data * s1.exp().mean()  # Eq. (8)
    torch.testing.assert_close(model.Z, Z)
    torch.testing.assert_close(out1, s1.exp() / Z)
    torch.manual_seed(2)
    out2, _, _ = model(x2, index)
    s2 = by_hand_scores(model, x2, index, seed=2)
    torch.testing.assert_close(model.Z, Z)  # not re-estimated on the second batch
    torch.testing.assert_close(out2, s2.exp() / Z)
    assert not torch.allclose(model.n_data * s2.exp().mean(), Z)  # so this batch would have given another Z
    resumed = tiny_insdis(seed=5)  # a new process: its flag is fresh, the checkpoint holds Z
    resumed.load_state_dict(model.state_dict())
    torch.manual_seed(2)
    resumed(x2, index)
    torch.testing.assert_close(resumed.Z, Z)


def test_proximal_term_is_eq_10_on_the_positive_bank_row():
    model = tiny_insdis()
    x, index = torch.randn(4, 3, 6, 6), torch.tensor([2, 4, 6, 8])
    out, f, v = model(x, index)
    assert torch.equal(v, model.memory[index])  # v_i^(t−1): the bank row before this step's update
    plain, _ = insdis.insdis_loss(out, f, v, model.n_data, softmax=False)
    prox, _ = insdis.insdis_loss(out, f, v, model.n_data, softmax=False, prox_lambda=3.0)
    torch.testing.assert_close(prox - plain, 3.0 * ((f - v) ** 2).sum(1).mean())
    prox.backward()  # the gradient flows into the encoder, not into the bank
    assert model.encoder.fc.weight.grad is not None and not model.memory.requires_grad


# ------------------------------------------------------------------------------------- memory bank
def test_memory_update_closed_form_on_the_batch_rows_only():
    model = tiny_insdis(m=0.3)
    before = model.memory.clone()
    torch.testing.assert_close(before.norm(dim=1), torch.ones(20))  # random unit vectors (Sec. 3.1)
    index, f = torch.tensor([3, 7, 11]), F.normalize(torch.randn(3, 8), dim=1)
    model._update_memory(index, f)
    expected = 0.3 * before[index] + 0.7 * f
    torch.testing.assert_close(model.memory[index], expected / expected.norm(dim=1, keepdim=True))
    others = torch.ones(20, dtype=torch.bool)
    others[index] = False
    assert torch.equal(model.memory[others], before[others])


def test_the_positive_is_the_samples_own_bank_row():
    model = tiny_insdis(n_data=50, K=10, T=0.1, softmax=True)
    x, index = torch.randn(6, 3, 6, 6), torch.tensor([4, 9, 17, 23, 31, 48])
    with torch.no_grad():
        f = F.normalize(model.encoder(x), dim=1)
        model.memory[index] = f  # each sample's own row is its feature: score 1/T, above any other row
    for seed in range(3):
        torch.manual_seed(seed)
        out, _, v = model(x, index)
        torch.testing.assert_close(out[:, 0], torch.full((6,), 10.0))  # column 0 is the own row, every draw
        assert (out[:, 1:] < 9.9).float().mean() > 0.9  # the noise columns are (mostly) other rows
        torch.testing.assert_close(out, by_hand_scores(model, x, index, seed))
        torch.testing.assert_close(v, f)


def index_batches(images, batch_size):
    """What the fill's loader yields: (images, targets, dataset indices) per batch."""
    return [(images[i:i + batch_size], torch.zeros(len(images[i:i + batch_size])), torch.arange(i, min(i + batch_size, len(images))))
            for i in range(0, len(images), batch_size)]


def test_bank_init_features_fills_every_row_with_its_images_initial_feature():
    """--bank-init features: row i ← normalise(encoder(image i)), BN in training mode batch by batch;
    a last batch of one image is skipped (BN needs two) and keeps its random row."""
    model = tiny_insdis(n_data=21).train()
    random_bank = model.memory.clone()
    images = torch.randn(21, 3, 6, 6)
    insdis.fill_bank(model, index_batches(images, 4), torch.device("cpu"))  # 5 batches of 4, then one of 1
    with torch.no_grad():
        expected = torch.cat([F.normalize(model.encoder(images[i:i + 4]), dim=1) for i in range(0, 20, 4)])
    torch.testing.assert_close(model.memory[:20], expected)
    assert torch.equal(model.memory[20], random_bank[20])


def _fill_worker(rank, world_size, out_dir):
    torch.manual_seed(0)  # the same initial encoder on both ranks, as DDP's start-up broadcast makes it
    model = insdis.InsDis(TinyNet, 16, dim=8, K=5, T=0.5, m=0.5).train()
    torch.manual_seed(100 + rank)
    images = torch.randn(8, 3, 6, 6)  # rank r holds images 8r..8r+7
    batches = [(images[i:i + 4], torch.zeros(4), torch.arange(8 * rank + i, 8 * rank + i + 4)) for i in (0, 4)]
    insdis.fill_bank(model, batches, torch.device("cpu"))
    with torch.no_grad():
        own = torch.cat([F.normalize(model.encoder(images[i:i + 4]), dim=1) for i in (0, 4)])
    torch.save({"memory": model.memory, "own": own}, os.path.join(out_dir, f"fill{rank}.pt"))


@pytest.mark.slow
@pytest.mark.gloo_worker(worker=_fill_worker)
def test_bank_init_features_gives_both_ranks_the_same_bank_with_both_ranks_rows(gloo_dir):
    r0, r1 = (torch.load(gloo_dir / f"fill{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["memory"], r1["memory"])
    torch.testing.assert_close(r0["memory"], torch.cat([r0["own"], r1["own"]]))


def _two_rank_worker(rank, world_size, out_dir):
    torch.manual_seed(100 + rank)  # different seeds: the bank must still start identical (fixed generator)
    model = insdis.InsDis(TinyNet, 16, dim=8, K=5, T=0.5, m=0.5)
    before = model.memory.clone()
    wrapped = ddp(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 6, 6) + rank  # each rank has its own images
    index = torch.tensor([[0, 2, 4, 6], [9, 11, 13, 15]][rank])
    out, f, v = wrapped(x, index)
    loss, _ = insdis.insdis_loss(out, f, v, 16, softmax=False)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model._update_memory(index, f.detach())
    torch.save({"before": before, "memory": model.memory, "Z": model.Z, "out": out.detach(), "f": f.detach(),
                "index": index}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
@pytest.mark.gloo_worker(worker=_two_rank_worker)
def test_two_ranks_hold_identical_banks_and_z_with_both_ranks_updates(gloo_dir):
    r0, r1 = (torch.load(gloo_dir / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["before"], r1["before"])
    assert torch.equal(r0["memory"], r1["memory"]) and torch.equal(r0["Z"], r1["Z"])
    # Z = N·mean over both ranks of exp(s): the mean of P = exp(s)/Z over the global batch is exactly 1/N
    mean_P = (r0["out"].mean() + r1["out"].mean()) / 2
    torch.testing.assert_close(mean_P, torch.tensor(1 / 16))
    assert abs(float(r0["out"].mean()) - 1 / 16) > 1e-4  # one rank's batch alone would give another Z
    before, after = r0["before"], r0["memory"]
    touched = torch.zeros(16, dtype=torch.bool)
    for r in (r0, r1):  # rank 0's rows and rank 1's rows, on both ranks
        expected = F.normalize(0.5 * before[r["index"]] + 0.5 * r["f"], dim=1)
        torch.testing.assert_close(after[r["index"]], expected)
        touched[r["index"]] = True
    assert torch.equal(after[~touched], before[~touched])


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """In this process, at one thread, with --bank-init features (the bank is filled once, at the start, never on
    resume) and the proximal term: a 2-epoch run straight through, a copy of its checkpoint after epoch 1 (the file a
    run killed then leaves), and that copy resumed with --resume auto; the resume's stdout."""
    root, threads = tmp_path_factory.mktemp("insdis"), torch.get_num_threads()
    straight, split = root / "straight", root / "split"
    split.mkdir()
    argv = TINY + ["--bank-init", "features", "--prox-lambda", "1", "--epochs", "2"]
    save = insdis.save_checkpoint

    def save_and_copy_epoch_1(state, path):
        save(state, path)
        if (state["epoch"], state["step"]) == (1, 0):
            shutil.copy(path, split / "checkpoint.pth.tar")

    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
            patch.setattr(insdis, "save_checkpoint", save_and_copy_epoch_1)
            insdis.main(argv + ["--output-dir", str(straight)])
        epoch_1 = torch.load(split / "checkpoint.pth.tar", weights_only=True)
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            insdis.main(argv + ["--output-dir", str(split), "--resume", "auto"])
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(straight=straight, split=split, epoch_1=epoch_1, resumed_stdout=stdout.getvalue())


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_run(runs):
    stdout = runs.resumed_stdout
    assert "(epoch 1)" in stdout and "Epoch: [1]" in stdout and "Epoch: [0]" not in stdout and "Prob" in stdout
    a, b = (torch.load(d / "checkpoint.pth.tar", weights_only=True) for d in (runs.straight, runs.split))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # weights, BN statistics, the bank and Z
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    # epoch 1 moved the bank, and kept the Z of the first batch of epoch 0
    assert not torch.equal(runs.epoch_1["state_dict"]["module.memory"], a["state_dict"]["module.memory"])
    assert torch.equal(runs.epoch_1["state_dict"]["module.Z"], a["state_dict"]["module.Z"])


@pytest.mark.slow
def test_checkpoint_and_linear_eval(runs, tmp_path, capsys):
    ckpt = torch.load(runs.straight / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["method"] == "insdis" and ckpt["arch"] == "resnet18" and ckpt["args"]["prox_lambda"] == 1
    state = ckpt["state_dict"]
    assert all(k.startswith("module.encoder.") or k in ("module.memory", "module.Z") for k in state)
    assert state["module.encoder.fc.weight"].shape == (128, 512) and state["module.memory"].shape == (64, 128)
    assert float(state["module.Z"]) > 0
    torch.testing.assert_close(state["module.memory"].norm(dim=1), torch.ones(64))
    data = ["--data", "synthetic:64", "--image-size", "8", "-j", "0", "-b", "32", "--seed", "0",
            "--output-dir", str(tmp_path), "--pretrained", str(runs.straight / "checkpoint.pth.tar")]
    metrics = linear_eval.main(data + ["--knn"])
    stdout = capsys.readouterr().out
    assert "used 120 keys (module.encoder.)" in stdout and "module.memory" in stdout
    assert "=> kNN (k=200, T=0.07): Acc@1" in stdout and 0.0 <= metrics["knn_acc1"] <= 100.0
    linear_eval.main(data + ["--epochs", "1"])
    stdout = capsys.readouterr().out
    assert "sanity check passed" in stdout and " * Acc@1" in stdout


@pytest.mark.slow
def test_two_process_run_with_torchrun(tmp_path):
    """The command line (the one start of this file): 2 ranks, Z estimated, the kNN monitor once, rank 0 prints."""
    proc = run_script("insdis.py", *TINY, "--epochs", "1", "--output-dir", tmp_path, "--knn-every", "1", nproc=2,
                      timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "=> creating model 'resnet18'" in proc.stdout and "Prob" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["method"] == "insdis" and ckpt["epoch"] == 1 and float(ckpt["state_dict"]["module.Z"]) > 0
    # 64 images, global batch 32: 2 steps of 16 images per rank; only rank 0 prints
    assert proc.stdout.count("Epoch: [0][0/2]") == 1 and proc.stdout.count(" * kNN Acc@1") == 1


@pytest.mark.slow
def test_softmax_run_on_an_image_folder_leaves_z_unset_and_the_knn_monitor_off_unless_asked(tmp_path, capsys):
    from PIL import Image
    for c in ("a", "b"):
        os.makedirs(tmp_path / "imgs" / c)
        for i in range(4):
            Image.new("RGB", (12, 12), (i * 40, 100, 200)).save(tmp_path / "imgs" / c / f"{i}.png")
    out = tmp_path / "out"
    run = ["--data", str(tmp_path / "imgs"), "-a", "resnet18", "-b", "4", "--nce-k", "4", "-j", "0",
           "--image-size", "8", "--epochs", "1", "--softmax", "--output-dir", str(out)]
    insdis.main(run)  # an image folder: the monitor is off by default
    assert " * kNN" not in capsys.readouterr().out
    ckpt = (out / "checkpoint.pth.tar").read_bytes()
    state = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 1 and state["args"]["softmax"]
    assert float(state["state_dict"]["module.Z"]) == -1.0  # the softmax needs no normalisation constant
    with pytest.raises(common.DataError, match=r"^data folder '.*imgs' has no val/ folder for evaluation$"):
        insdis.main(run + ["--knn-every", "1"])  # asked for, on a folder without val/
    assert (out / "checkpoint.pth.tar").read_bytes() == ckpt  # before training


# -------------------------------------------------------------------------------------- errors
def test_nce_k_must_be_smaller_than_the_bank(tmp_path):
    with pytest.raises(SystemExit) as err:
        insdis.main(["--data", "synthetic:64", "--nce-k", "64", "-a", "resnet18", "-b", "32", "-j", "0",
                     "--output-dir", str(tmp_path)])
    assert str(err.value) == "insdis.py: --nce-k 64 must be smaller than the memory bank (64 images in 'synthetic:64')"


def test_underscore_aliases_and_official_defaults():
    args = insdis.parse_args(["--data", "synthetic", "--nce_k", "16384", "--nce_t", "0.1", "--nce_m", "0.9",
                              "--feat_dim", "64", "--softmax"])
    assert (args.nce_k, args.nce_t, args.nce_m, args.feat_dim, args.softmax) == (16384, 0.1, 0.9, 64, True)
    args = insdis.parse_args(["/imagenet"])  # paper defaults, official positional data
    assert (args.data, args.nce_k, args.nce_t, args.nce_m, args.lr, args.batch_size, args.epochs, args.schedule) == \
        ("/imagenet", 4096, 0.07, 0.5, 0.03, 256, 200, [120, 160])
