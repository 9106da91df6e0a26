"""MoCo: InfoNCE, queue, momentum encoder, shuffling BN, split BN, end to end (one process, resume, torchrun), the
errors moco.py words itself (the scaffold's: tests/test_errors.py, tests/test_scaffold.py)."""
import contextlib
import io
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moco
from conftest import ddp, run_script

# the short run of moco.py (tests/test_preemption.py, test_scaffold.py): 256 images of 16 px, global batch 32, 8 steps
TINY = ["--data", "synthetic:256", "-a", "resnet18", "-b", "32", "--moco-k", "128", "--moco-dim", "16",
        "--image-size", "16", "-j", "0", "--seed", "0", "-p", "4"]
TINY += ["--stem", "imagenet", "--knn-every", "0"]  # the CIFAR stem and the monitor: test_monitor.py


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """Two cores shared with other jobs: one intra-op thread, also for the module's shared runs (conftest.one_thread
    is per test, set up after a module fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    """Stands in for a torchvision ResNet: `num_classes` sets the output, `fc` is the head, and a
    BatchNorm makes outputs depend on the batch (what shuffling BN is about)."""

    def __init__(self, num_classes: int = 8, norm_layer=None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), (norm_layer or nn.BatchNorm2d)(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def tiny_moco(K=16, m=0.999, T=0.07, seed=0, **kw):
    torch.manual_seed(seed)
    return moco.MoCo(TinyNet, dim=8, K=K, m=m, T=T, **kw)


# ------------------------------------------------------------------------------------- InfoNCE
def test_infonce_matches_closed_form_with_positive_at_label_0():
    model = tiny_moco(K=16, m=0.0, T=0.2).eval()  # m=0: the key encoder is a copy of the query encoder
    queue = model.queue.clone()
    im_q, im_k = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    logits, labels, k = model(im_q, im_k)
    q = F.normalize(model.encoder_q(im_q), dim=1)
    k_ref = F.normalize(model.encoder_q(im_k), dim=1)
    torch.testing.assert_close(k, k_ref)
    pos = (q * k_ref).sum(1) / 0.2
    neg = q @ queue / 0.2
    # Eq. (1): −log exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_j exp(q·k_j/τ))
    closed = -(pos.exp() / (pos.exp() + neg.exp().sum(1))).log().mean()
    assert labels.eq(0).all() and logits.shape == (4, 17)
    torch.testing.assert_close(moco.infonce_loss(logits, labels), closed)
    # the positive really is column 0: moving it elsewhere changes the loss
    swapped = torch.cat([logits[:, 1:2], logits[:, :1], logits[:, 2:]], 1)
    assert not torch.allclose(moco.infonce_loss(swapped, labels), closed)


def test_infonce_is_small_when_the_positive_dominates():
    logits = torch.tensor([[50.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    loss = moco.infonce_loss(logits, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(loss, torch.tensor(4.0).log() / 2, atol=1e-6, rtol=0)  # (≈0 + log 4) / 2


# --------------------------------------------------------------------------------------- queue
def test_the_initial_queue_is_random_unit_keys_the_same_on_every_rank():
    a, b = tiny_moco(K=16, seed=0), tiny_moco(K=16, seed=1)  # the global seed differs, as between ranks
    torch.testing.assert_close(a.queue.norm(dim=0), torch.ones(16))  # each column a key of unit length
    assert torch.equal(a.queue, b.queue) and int(a.queue_ptr) == 0  # a fixed generator
    assert a.queue.std(1).min() > 0.1  # random, not one key repeated


def test_queue_is_fifo_and_the_pointer_wraps():
    model = tiny_moco(K=6)
    batches = [F.normalize(torch.randn(4, 8), dim=1) for _ in range(3)]
    model._dequeue_and_enqueue(batches[0])
    assert int(model.queue_ptr) == 4
    torch.testing.assert_close(model.queue[:, :4], batches[0].t())
    model._dequeue_and_enqueue(batches[1])  # columns 4, 5 then wraps to 0, 1: the oldest go first
    assert int(model.queue_ptr) == 2
    torch.testing.assert_close(model.queue[:, 4:6], batches[1][:2].t())
    torch.testing.assert_close(model.queue[:, 0:2], batches[1][2:].t())
    torch.testing.assert_close(model.queue[:, 2:4], batches[0][2:].t())  # not yet overwritten
    model._dequeue_and_enqueue(batches[2])
    assert int(model.queue_ptr) == 0
    torch.testing.assert_close(model.queue[:, 2:6], batches[2].t())


def _queue_step_worker(rank, world_size, out_dir):
    model = tiny_moco(K=16)
    wrapped = ddp(model)  # as moco.py wraps it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # each rank has its own images
    im_q, im_k = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    logits, labels, k = wrapped(im_q, im_k)
    moco.infonce_loss(logits, labels).backward()
    optimizer.step()
    model._dequeue_and_enqueue(k)
    torch.save({"queue": model.queue, "ptr": model.queue_ptr, "k": k}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
@pytest.mark.gloo_worker(worker=_queue_step_worker)
def test_queue_holds_the_gathered_global_batch_and_is_identical_on_both_ranks(gloo_dir):
    r0, r1 = (torch.load(gloo_dir / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["queue"], r1["queue"])
    assert int(r0["ptr"]) == int(r1["ptr"]) == 8  # the global batch, not the local 4
    global_keys = torch.cat([r0["k"], r1["k"]])  # rank order
    assert not torch.allclose(r0["k"], r1["k"])
    torch.testing.assert_close(r0["queue"][:, :8], global_keys.t())


def test_queue_init_keys_fills_the_queue_with_the_initial_key_encoders_keys():
    """--queue-init keys: column j ← the key of image j under the initial key encoder (BN in training
    mode, batch by batch), whole global batches only; the pointer is back at 0; encoder_q untouched."""
    model = tiny_moco(K=16)
    random_queue, query_weights = model.queue.clone(), model.encoder_q.fc.weight.clone()
    images = torch.randn(22, 3, 6, 6)  # 5 whole batches of 4 and a partial one
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(22)), batch_size=4)
    moco.fill_queue(model, loader, torch.device("cpu"))
    assert int(model.queue_ptr) == 0 and not torch.allclose(model.queue, random_queue)
    with torch.no_grad():
        keys = torch.cat([F.normalize(model.encoder_k(images[i:i + 4]), dim=1) for i in range(0, 16, 4)])
    torch.testing.assert_close(model.queue, keys.t())  # the first K = 16 images, in order, nothing after them
    assert torch.equal(model.encoder_q.fc.weight, query_weights)


# ----------------------------------------------------------------------------------------- EMA
def test_momentum_update_is_eq_2():
    model = tiny_moco(m=0.9)
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for p_k, old_k, p_q in zip(model.encoder_k.parameters(), before_k, model.encoder_q.parameters()):
        torch.testing.assert_close(p_k, 0.9 * old_k + 0.1 * p_q)


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_momentum_0_copies_and_1_freezes(m):
    model = tiny_moco(m=m)
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    expected = model.encoder_q.parameters() if m == 0.0 else before_k
    for p_k, ref in zip(model.encoder_k.parameters(), expected):
        assert torch.equal(p_k, ref)


def test_key_encoder_gets_no_gradient_and_query_encoder_does():
    model = tiny_moco().train()
    logits, labels, k = model(torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6))
    moco.infonce_loss(logits, labels).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert not k.requires_grad and not model.queue.requires_grad


# ----------------------------------------------------------------------------------- shuffle BN
def _shuffle_worker(rank, world_size, out_dir):
    torch.manual_seed(0)  # same encoder everywhere
    encoder = TinyNet()
    torch.manual_seed(10 + rank)
    x = torch.randn(8, 3, 6, 6) + rank  # ranks hold different data
    shuffled, idx_unshuffle = moco.batch_shuffle(x)
    restored = moco.batch_unshuffle(shuffled, idx_unshuffle)
    out = {"x": x, "shuffled": shuffled, "restored": restored}
    for mode in ("eval", "train"):  # eval first: train-mode passes change each rank's running stats
        encoder.train(mode == "train")
        with torch.no_grad():
            x_s, idx = moco.batch_shuffle(x)
            out[mode + "_shuffled"] = moco.batch_unshuffle(encoder(x_s), idx)
            out[mode + "_plain"] = encoder(x)
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
@pytest.mark.gloo_worker(worker=_shuffle_worker)
def test_shuffle_bn_across_two_ranks(gloo_dir):
    r0, r1 = (torch.load(gloo_dir / f"{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert torch.equal(r["restored"], r["x"])  # shuffle then unshuffle is the identity
    # the shuffled batches are a permutation of the global batch that mixes the ranks
    everything = torch.cat([r0["x"], r1["x"]]).flatten(1)
    shuffled = torch.cat([r0["shuffled"], r1["shuffled"]]).flatten(1)
    assert torch.equal(everything.sort(0).values, shuffled.sort(0).values)
    from_rank1 = (r0["shuffled"].flatten(1)[:, None] == r1["x"].flatten(1)[None]).all(-1).any(1)
    assert 0 < int(from_rank1.sum()) < 8
    for r in (r0, r1):  # train mode: BN statistics come from a different mix of samples
        assert not torch.allclose(r["train_shuffled"], r["train_plain"], atol=1e-4)
        torch.testing.assert_close(r["eval_shuffled"], r["eval_plain"])  # eval mode: no batch dependence


def test_shuffle_without_process_group_is_a_local_permutation():
    x = torch.randn(8, 3)
    shuffled, idx = moco.batch_shuffle(x)
    assert torch.equal(moco.batch_unshuffle(shuffled, idx), x)
    assert torch.equal(shuffled.sort(0).values, x.sort(0).values)


# ------------------------------------------------------------------------------------- split BN
def test_split_bn_normalises_each_sub_batch_with_its_own_statistics():
    bn = moco.SplitBatchNorm(3, num_splits=2).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(8, 3, 4, 4)
    x[1::2] = x[1::2] * 3 + 5  # sub-batch 1 (odd samples) has very different statistics
    out = bn(x)
    for s in range(2):
        sub = x[s::2]
        mean = sub.mean((0, 2, 3), keepdim=True)
        var = sub.var((0, 2, 3), unbiased=False, keepdim=True)
        ref = (sub - mean) / (var + bn.eps).sqrt() * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
        torch.testing.assert_close(out[s::2], ref, atol=1e-5, rtol=1e-5)
    # running stats: momentum 0.1 from (0, 1), averaged over the two sub-batches
    sub_means = torch.stack([x[s::2].mean((0, 2, 3)) for s in range(2)])
    sub_vars = torch.stack([x[s::2].var((0, 2, 3), unbiased=True) for s in range(2)])
    torch.testing.assert_close(bn.running_mean, 0.1 * sub_means.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * sub_vars.mean(0))
    bn.eval()  # eval mode uses the averaged running statistics
    ref = (x - bn.running_mean.view(1, 3, 1, 1)) / (bn.running_var.view(1, 3, 1, 1) + bn.eps).sqrt()
    torch.testing.assert_close(bn(x), ref * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1), atol=1e-5, rtol=1e-5)


def test_split_bn_with_one_split_is_plain_batchnorm():
    bn, plain = moco.SplitBatchNorm(3, num_splits=1).train(), nn.BatchNorm2d(3).train()
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(bn(x), plain(x))
    torch.testing.assert_close(bn.running_var, plain.running_var)


# ---------------------------------------------------------------------------------- end to end
# TINY at 64 images: 2 steps an epoch, every v2 option, split BN and the queue filled with keys at the start (K = 64:
# the two batches of the data), never on resume
RUN = TINY + ["--data", "synthetic:64", "--moco-k", "64", "--bn-splits", "2", "--mlp", "--aug-plus", "--cos",
              "--queue-init", "keys"]


def load(folder):
    return torch.load(folder / "checkpoint.pth.tar", weights_only=True)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """One epoch of RUN in this process (a failure raises SystemExit here): the folder and what it printed. The first
    half of the resumed run below, and the reference of the loader-workers run; made once."""
    out = tmp_path_factory.mktemp("moco_one_epoch")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        moco.main(RUN + ["--epochs", "1", "--output-dir", str(out)])
    return out, stdout.getvalue()


@pytest.mark.slow
def test_one_process_run_checkpoints_and_its_resume_reproduces_the_uninterrupted_run(one_epoch, tmp_path, capsys):
    out, stdout = one_epoch
    assert "=> creating model 'resnet18'" in stdout and "Epoch: [0][1/2]" in stdout and "Acc@1" in stdout
    ckpt = load(out)
    assert (ckpt["method"], ckpt["arch"], ckpt["epoch"], ckpt["step"]) == ("moco", "resnet18", 1, 0)
    keys = list(ckpt["state_dict"])
    assert all(k.startswith(("module.encoder_q.", "module.encoder_k.", "module.queue")) for k in keys)
    assert "module.queue_ptr" in keys and "module.encoder_q.fc.0.weight" in keys  # --mlp
    assert ckpt["state_dict"]["module.queue"].shape == (16, 64)
    split, straight = tmp_path / "split", tmp_path / "straight"
    shutil.copytree(out, split)
    moco.main(RUN + ["--epochs", "2", "--output-dir", str(split), "--resume", "auto"])
    resumed = capsys.readouterr().out
    assert f"=> loaded checkpoint '{split / 'checkpoint.pth.tar'}' (epoch 1)" in resumed
    assert "Epoch: [1][0/2]" in resumed and "Epoch: [0]" not in resumed
    moco.main(RUN + ["--epochs", "2", "--output-dir", str(straight)])
    a, b = load(straight), load(split)
    assert a["epoch"] == b["epoch"] == 2 and a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # weights, key encoder, queue and pointer, split-BN statistics
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][key]["momentum_buffer"],
                           b["optimizer"]["state"][key]["momentum_buffer"])
    assert [json.loads(line)["epoch"] for line in (split / "log.txt").read_text().splitlines()] == [0, 1]


@pytest.mark.slow
def test_two_loader_workers_train_exactly_as_the_main_process(one_epoch, tmp_path):
    """Views are seeded per sample (common.SeededViews), so who loads a sample cannot change the run (nor the
    queue --queue-init keys fills from the loader)."""
    argv = RUN + ["--epochs", "1", "--output-dir", str(tmp_path)]
    argv[argv.index("-j") + 1] = "2"
    with contextlib.redirect_stdout(io.StringIO()):
        moco.main(argv)
    runs = [load(folder)["state_dict"] for folder in (one_epoch[0], tmp_path)]  # -j 0, -j 2
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


@pytest.mark.slow
def test_the_command_line_trains_two_ranks_with_torchrun_end_to_end(tmp_path):
    """The real command line under torchrun at the smallest settings (32 images of 8 px, global batch 16: 2 steps of
    8 images a rank): it parses, trains, runs the kNN monitor over both ranks, checkpoints and logs; only rank 0
    prints. Every enqueue writes the keys of the global batch: after 2 steps the pointer is at 2 × 16, the queue's
    first 32 columns are keys, the last 16 still the initial random ones."""
    proc = run_script("moco.py", "--data", "synthetic:32", "-a", "resnet18", "-b", "16", "--image-size", "8",
                      "--moco-k", "48", "--moco-dim", "8", "--epochs", "1", "-j", "0", "-p", "1", "--seed", "0",
                      "--knn-every", "1", "--output-dir", tmp_path, nproc=2, timeout=90, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("=> creating model 'resnet18'") == 1
    assert proc.stdout.count("Epoch: [0][0/2]") == 1 and proc.stdout.count("Epoch: [0][1/2]") == 1
    assert proc.stdout.count(" * kNN Acc@1 ") == 1
    done = f"=> done: epoch 1 of 1; checkpoint '{tmp_path / 'checkpoint.pth.tar'}'"
    assert proc.stdout.strip().splitlines()[-1] == done
    ckpt = load(tmp_path)
    assert (ckpt["method"], ckpt["epoch"], ckpt["step"], ckpt["args"]["batch_size"]) == ("moco", 1, 0, 16)
    assert ckpt["args"]["stem"] == "cifar"  # auto: 8 px <= 32
    queue, initial = ckpt["state_dict"]["module.queue"], moco.MoCo(TinyNet, 8, 48).queue  # a fixed generator
    assert int(ckpt["state_dict"]["module.queue_ptr"]) == 32
    assert torch.equal(queue[:, 32:], initial[:, 32:]) and (queue[:, :32] != initial[:, :32]).any(0).all()
    torch.testing.assert_close(queue.norm(dim=0), torch.ones(48))  # unit keys
    log = json.loads((tmp_path / "log.txt").read_text())
    assert log["epoch"] == 0 and math.isfinite(log["loss"]) and 0 <= log["knn_acc1"] <= 100


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("flags, message", [
    (["--moco-k", "100"], "--moco-k 100 is not a multiple of the global batch 32"),
    (["--bn-splits", "3"], "-b 32 leaves 32 image per process, fewer than BatchNorm needs (2) in each of --bn-splits 3 "
                           "equal sub-batches"),
    (["--bn-splits", "32"], "-b 32 leaves 32 image per process, fewer than BatchNorm needs (2) in each of --bn-splits "
                            "32 equal sub-batches"),
])
def test_moco_start_up_errors(flags, message, tmp_path):
    with pytest.raises(SystemExit) as err:
        moco.main(TINY + flags + ["--output-dir", str(tmp_path)])
    assert str(err.value) == f"moco.py: {message}"
