"""linear_eval.py: kNN, frozen backbone + sanity check, protocols (SimSiam's LARC), best/last top-1, the random
floor's BN statistics (one process and two ranks), checkpoint layouts, export, errors."""
import contextlib
import io
import json
import math
import os
import random
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.models as models

import common
import linear_eval
import moco

DATA = ["--data", "synthetic:40", "--image-size", "16", "-j", "0", "-b", "20", "--seed", "0"]  # 2 steps, 10 val
FLOOR = DATA + ["-a", "resnet18"]  # random weights (the CIFAR stem at 16 px)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moco_checkpoint(tmp_path_factory):
    out, threads = tmp_path_factory.mktemp("moco"), torch.get_num_threads()
    torch.set_num_threads(1)  # before the function-scoped one_thread fixture
    moco.main(["--data", "synthetic:16", "-a", "resnet18", "-b", "8", "--image-size", "16", "--moco-k", "16",
               "--moco-dim", "8", "-j", "0", "--epochs", "1", "--seed", "0", "--stem", "imagenet", "--knn-every", "0",
               "--output-dir", str(out)])
    torch.set_num_threads(threads)
    return out / "checkpoint.pth.tar"


def recorder(monkeypatch, module, name):
    """Replaces module.name by a wrapper that records each call's arguments and still runs the real function."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


# ------------------------------------------------------------------------------------------ kNN
def test_knn_weighted_vote_by_hand():
    """k=3 neighbours: two of class 0 at similarity 0.1, one of class 1 at 0.9. A majority vote says
    0; the weighted vote (weights exp(s/T), Wu et al. Sec. 3.4) says 1. The far point is not a neighbour."""
    q = torch.tensor([[1.0, 0.0, 0.0]])
    train = torch.tensor([[0.1, math.sqrt(1 - 0.01), 0.0], [0.1, 0.0, math.sqrt(1 - 0.01)],
                          [0.9, math.sqrt(1 - 0.81), 0.0], [-1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    scores = common.knn_classify(q, train, labels, num_classes=2, k=3, T=0.07)
    expected = torch.tensor([[2 * math.exp(0.1 / 0.07), math.exp(0.9 / 0.07)]])
    torch.testing.assert_close(scores, expected)
    assert int(scores.argmax(1)) == 1
    # with a high temperature the weights flatten and the two class-0 neighbours win
    assert int(common.knn_classify(q, train, labels, 2, k=3, T=100.0).argmax(1)) == 0


def test_knn_chunks_give_the_same_scores():
    feats, train = F.normalize(torch.randn(50, 8), dim=1), F.normalize(torch.randn(30, 8), dim=1)
    labels = torch.randint(0, 4, (30,))
    torch.testing.assert_close(common.knn_classify(feats, train, labels, 4, k=5, chunk=7),
                               common.knn_classify(feats, train, labels, 4, k=5, chunk=1000), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------- frozen backbone + check
@pytest.mark.slow
def test_probe_trains_only_the_linear_layer_on_the_frozen_backbone(moco_checkpoint, tmp_path, capsys, monkeypatch):
    bn_passes = recorder(monkeypatch, torch.optim.swa_utils, "update_bn")
    larc = recorder(monkeypatch, linear_eval, "larc_")
    metrics = linear_eval.main(DATA + ["--pretrained", str(moco_checkpoint), "--epochs", "1", "--lr", "1.0",
                                       "--output-dir", str(tmp_path)])
    assert 0.0 <= metrics["acc1"] <= 100.0 and metrics["epoch"] == 0
    out = capsys.readouterr().out
    assert "MoCo v1/v2 (ours or official), arch resnet18, imagenet stem; used 120 keys (module.encoder_q.)" in out
    assert "module.encoder_k.* (122)" in out  # the key encoder and both heads are ignored
    assert "(backbone unchanged: sanity check passed)" in out.strip().splitlines()[-1]
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["method"] == "linear" and set(ckpt["state_dict"]) == {"module.weight", "module.bias"}
    assert ckpt["optimizer"]["param_groups"][0]["params"] == [0, 1]  # the classifier's two tensors, nothing else
    _, state = linear_eval.load_backbone(str(moco_checkpoint), None, "auto", log=lambda line: None)
    assert ckpt["args"]["backbone_sha1"] == linear_eval.fingerprint(state)  # which weights it probed
    assert not bn_passes  # a pre-trained backbone keeps the BN statistics it was trained with
    assert not larc  # --protocol moco: plain SGD


@pytest.mark.slow
def test_sanity_check_fails_on_any_change_of_the_backbone(moco_checkpoint, tmp_path, capsys, monkeypatch):
    real = linear_eval.train_one_epoch

    def leaky(loader, backbone, *args):
        with torch.no_grad():  # what BN in train mode would do, by the smallest amount
            backbone.encoder.layer3[0].bn1.running_mean[0] += 1e-6
        return real(loader, backbone, *args)

    monkeypatch.setattr(linear_eval, "train_one_epoch", leaky)
    with pytest.raises(SystemExit, match="sanity check failed: the backbone changed during linear evaluation$"):
        linear_eval.main(DATA + ["--pretrained", str(moco_checkpoint), "--epochs", "1", "--output-dir", str(tmp_path)])
    assert "sanity check passed" not in capsys.readouterr().out


# --------------------------------------------------------------------------------- protocols
def test_simsiam_protocol_defaults_are_the_official_main_lincls():
    """facebookresearch/simsiam main_lincls.py: lr 0.1 × batch/256 (App. A says 0.02; issue #13: the
    released models used 0.1), batch 4096, 90 epochs, cosine, wd 0, LARS (apex LARC) on both parameters."""
    args = linear_eval.parse_args(["--data", "synthetic", "--protocol", "simsiam"])
    assert (args.lr, args.batch_size, args.epochs, args.wd, args.cos) == (0.1, 4096, 90, 0.0, True)
    args = linear_eval.parse_args(["--data", "synthetic", "--protocol", "simsiam", "--epochs", "3"])
    assert args.epochs == 3  # explicit flags win
    args = linear_eval.parse_args(["--data", "synthetic"])
    assert (args.lr, args.batch_size, args.epochs, args.cos, args.schedule) == (30.0, 256, 100, False, [60, 80])


@pytest.mark.slow
def test_simsiam_protocol_runs_larc_then_sgd_without_decay(moco_checkpoint, tmp_path, monkeypatch):
    larc = recorder(monkeypatch, linear_eval, "larc_")
    linear_eval.main(DATA + ["--pretrained", str(moco_checkpoint), "--protocol", "simsiam", "--epochs", "1",
                             "--wd", "0.001", "--output-dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["args"]["init_lr"] == pytest.approx(0.1 * 20 / 256)
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0 and group["momentum"] == 0.9  # the decay is larc_'s, once
    assert len(larc) == 2 and all(args[1] == 0.001 for args, _ in larc)  # every step (40 images, -b 20)


def test_larc_then_sgd_is_a_hand_computed_lars_step():
    """apex LARC around SGD (SimSiam's main_lincls.py): every parameter, bias included, gets the gradient plus
    decay, g' = g + λw, scaled by η‖w‖/‖g'‖, trust 1 where a norm is 0 (the bias at 0 on its first step); then
    momentum SGD without decay: v ← m·v + g'', w ← w − lr·v. At λ = 0 this is LARC.py l. 94 (η‖w‖/(‖g‖ + λ‖w‖ + ε))
    exactly, up to its ε."""
    classifier = torch.nn.Linear(2, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[0.3, -0.4], [0.0, 0.5]]))
        classifier.bias.zero_()
    optimizer = torch.optim.SGD(classifier.parameters(), 0.5, momentum=0.9, weight_decay=0)
    eta, lr, m, wd = 0.001, 0.5, 0.9, 0.01
    w, b = classifier.weight.detach().clone().double(), torch.zeros(2, dtype=torch.float64)
    v_w, v_b = torch.zeros_like(w), torch.zeros_like(b)
    grads = [(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), torch.tensor([2.0, -1.0])),
             (torch.tensor([[0.5, -0.5], [0.25, 1.0]]), torch.tensor([0.5, 1.5]))]
    for g_w, g_b in grads:
        classifier.weight.grad, classifier.bias.grad = g_w.clone(), g_b.clone()
        linear_eval.larc_(classifier.parameters(), wd)
        optimizer.step()
        steps = []
        for p, g in ((w, g_w.double()), (b, g_b.double())):
            g = g + wd * p
            trust = eta * p.norm() / g.norm() if p.norm() > 0 and g.norm() > 0 else 1.0
            steps.append(trust * g)
        v_w, v_b = m * v_w + steps[0], m * v_b + steps[1]
        w, b = w - lr * v_w, b - lr * v_b
        torch.testing.assert_close(classifier.weight.detach().double(), w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(classifier.bias.detach().double(), b, rtol=1e-6, atol=1e-7)
    assert b.abs().max() > 0.5  # the bias's first step was not scaled by η: trust 1 at ‖b‖ = 0
    g, p = torch.tensor([3.0, -4.0]), torch.nn.Parameter(torch.tensor([0.6, 0.8]))  # λ = 0: apex's own formula
    p.grad = g.clone()
    linear_eval.larc_([p], 0.0)
    torch.testing.assert_close(p.grad, g * eta * 1.0 / (5.0 + 1e-8))


@pytest.mark.slow
def test_probe_reports_last_and_best_epoch_and_keeps_best_over_resume(moco_checkpoint, tmp_path, capsys):
    """The official main_lincls.py keeps the best epoch's top-1 (and saves it); we print and return
    it beside the last one, which stays `acc1` and starts the final line."""
    probe = DATA + ["--pretrained", str(moco_checkpoint), "--lr", "0.5", "--output-dir", str(tmp_path)]
    linear_eval.main(probe + ["--epochs", "2"])
    metrics = linear_eval.main(probe + ["--epochs", "3", "--resume", "auto"])
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    accs = [entry["acc1"] for entry in log]
    assert len(accs) == 3 and metrics["acc1"] == accs[-1] and [entry["epoch"] for entry in log] == [0, 1, 2]
    assert metrics["best_acc1"] == max(accs) and metrics["best_epoch"] == accs.index(max(accs))
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith(f"=> linear probe: Acc@1 {accs[-1]:.2f} Acc@5 ")
    assert f"best Acc@1 {max(accs):.2f} (epoch {accs.index(max(accs))})" in last_line
    assert torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["best_acc1"] == max(accs)


# --------------------------------------------------------------------------------- the random floor
def bn_buffers(backbone) -> dict:
    return {k: v.clone() for k, v in backbone.state_dict().items() if "running_" in k}


def floor_run(monkeypatch, argv):
    """linear_eval.main on random weights, recording its BN pass: (metrics, the backbone, the pass's loader, the
    weights before it, this process's statistics before they were averaged over the ranks)."""
    seen = {}
    real = torch.optim.swa_utils.update_bn

    def update_bn(loader, model, device=None):
        assert "loader" not in seen, "one BN pass"
        seen.update(loader=loader, backbone=model, before={k: v.clone() for k, v in model.state_dict().items()})
        real(loader, model, device)
        seen["local"] = bn_buffers(model)
    monkeypatch.setattr(torch.optim.swa_utils, "update_bn", update_bn)
    metrics = linear_eval.main(argv)
    return metrics, seen


def _floor_probe_on_ranks(rank, world_size, out_dir):
    """The random floor's probe on the two gloo ranks of the session, as torchrun would run it: Run reads RANK and
    WORLD_SIZE and uses the group that is already up (it neither creates nor destroys it here)."""
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)}
    stdout, python_rng = io.StringIO(), random.getstate()
    with pytest.MonkeyPatch.context() as monkeypatch, mock.patch.dict(os.environ, env), \
            contextlib.redirect_stdout(stdout), torch.random.fork_rng(devices=[]):  # the next workers' RNG as it was
        monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: None)
        monkeypatch.setattr(dist, "destroy_process_group", lambda *args, **kwargs: None)
        metrics, seen = floor_run(monkeypatch, FLOOR + ["--epochs", "1", "--lr", "0.1", "--output-dir",
                                                        str(out_dir / "probe")])
    random.setstate(python_rng)
    torch.save({"metrics": metrics, "local": seen["local"], "final": bn_buffers(seen["backbone"]),
                "stdout": stdout.getvalue()}, out_dir / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.gloo_worker(worker=_floor_probe_on_ranks)
def test_random_floor_bn_statistics_are_the_exact_average_over_the_images_and_the_ranks(gloo_dir, tmp_path,
                                                                                        monkeypatch, capsys):
    metrics, seen = floor_run(monkeypatch, FLOOR + ["--knn", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "with random weights; BN statistics from the data" in out and "=> kNN (k=200, T=0.07): Acc@1" in out
    assert 0 <= metrics["knn_acc1"] <= 100
    loader, backbone = seen["loader"], seen["backbone"]
    batches = [images for images, _ in loader]  # the training images in the evaluation view, each once
    assert len(loader.dataset) == 40 and [len(x) for x in batches] == [20, 20]
    assert all(torch.equal(a, b) for a, b in zip(batches, [images for images, _ in loader]))  # no random view
    state = backbone.state_dict()
    for key, value in seen["before"].items():  # the pass changes no weight, only the statistics
        assert torch.equal(value, state[key]) or "running_" in key or "num_batches" in key, key
    bn1 = backbone.encoder.bn1
    with torch.no_grad():
        conv = [backbone.encoder.conv1(x) for x in batches]
    torch.testing.assert_close(bn1.running_mean, torch.cat(conv).mean((0, 2, 3)), rtol=0, atol=1e-5)  # every image
    torch.testing.assert_close(bn1.running_var, torch.stack([c.var((0, 2, 3)) for c in conv]).mean(0),
                               rtol=1e-4, atol=0)  # torch's running_var: the unbiased batch variance, averaged
    assert bn1.momentum == 0.1 and not backbone.training

    ranks = [torch.load(gloo_dir / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for key, final in ranks[0]["final"].items():  # both ranks hold the mean of their two estimates
        torch.testing.assert_close(final, (ranks[0]["local"][key] + ranks[1]["local"][key]) / 2, rtol=1e-6, atol=0)
        assert torch.equal(final, ranks[1]["final"][key]), key
    assert not torch.equal(ranks[0]["local"]["encoder.bn1.running_mean"], ranks[1]["local"]["encoder.bn1.running_mean"])
    torch.testing.assert_close(ranks[0]["final"]["encoder.bn1.running_mean"], bn1.running_mean, rtol=0, atol=1e-5)
    evaluated = ("acc1", "acc5", "best_acc1")  # on the gathered val features: the same classifier on both ranks
    assert [ranks[0]["metrics"][k] for k in evaluated] == [ranks[1]["metrics"][k] for k in evaluated]
    assert ranks[0]["stdout"].count(" * Acc@1") == 1 and "sanity check passed" in ranks[0]["stdout"]
    assert ranks[1]["stdout"] == ""  # rank 0 alone prints


# ---------------------------------------------------------------------------------- layouts
def resnet18_state(num_classes=128):
    torch.manual_seed(1)
    return models.resnet18(num_classes=num_classes).state_dict()


def official_layouts():
    """Random weights laid out exactly as each official repository saves them."""
    body = {k: v for k, v in resnet18_state().items() if not k.startswith("fc.")}
    mlp_head = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.randn(512),
                "fc.2.weight": torch.randn(128, 512), "fc.2.bias": torch.randn(128)}
    moco_v2 = {**{f"module.encoder_q.{k}": v for k, v in {**body, **mlp_head}.items()},
               **{f"module.encoder_k.{k}": v for k, v in {**body, **mlp_head}.items()},
               "module.queue": torch.randn(128, 256), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    simsiam = {**{f"module.encoder.{k}": v for k, v in body.items()},
               "module.encoder.fc.0.weight": torch.randn(512, 512), "module.encoder.fc.1.weight": torch.randn(512),
               "module.predictor.0.weight": torch.randn(128, 512)}
    moco_v3 = {**{f"module.base_encoder.{k}": v for k, v in body.items()},
               **{f"module.momentum_encoder.{k}": v for k, v in body.items()},
               "module.base_encoder.fc.0.weight": torch.randn(4096, 512),
               "module.predictor.0.weight": torch.randn(256, 4096)}
    return body, {
        "MoCo v1/v2": ({"epoch": 200, "arch": "resnet18", "state_dict": moco_v2, "optimizer": {}}, "module.encoder_q."),
        "SimSiam": ({"epoch": 100, "arch": "resnet18", "state_dict": simsiam, "optimizer": {}}, "module.encoder."),
        "MoCo v3": ({"epoch": 100, "arch": "resnet18", "state_dict": moco_v3, "optimizer": {}, "scaler": {}},
                    "module.base_encoder."),
        "torchvision": ({**body, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}, "no prefix"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MoCo v1/v2", "SimSiam", "MoCo v3", "torchvision"])
def test_official_checkpoints_load_with_the_right_keys(name, tmp_path, capsys):
    body, layouts = official_layouts()
    ckpt, prefix = layouts[name]
    torch.save(ckpt, tmp_path / "ckpt.pth")
    backbone, reference = linear_eval.load_backbone(str(tmp_path / "ckpt.pth"), "resnet18", "auto")
    for key, value in body.items():  # every backbone tensor came from the checkpoint, heads dropped
        assert torch.equal(backbone.encoder.state_dict()[key], value), key
        assert torch.equal(reference["encoder." + key], value), key  # the sanity check's copy
    out = capsys.readouterr().out
    assert f"used {len(body)} keys ({prefix})" in out
    state = ckpt.get("state_dict", ckpt)
    assert f"ignored {len(state) - len(body)}:" in out


def test_a_checkpoint_that_is_not_a_dict_is_refused_in_one_line(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")  # tensors only, but no state_dict
    with pytest.raises(SystemExit, match=r"^linear_eval.py: --pretrained: '.*tensor.pth' holds a Tensor, not a "
                                         r"checkpoint dict$"):
        linear_eval.load_backbone(str(tmp_path / "tensor.pth"), "resnet18", "auto")


@pytest.mark.slow
def test_export_loads_into_torchvision_with_only_fc_missing(moco_checkpoint, tmp_path, capsys):
    linear_eval.main(["--data", "synthetic:16", "--pretrained", str(moco_checkpoint), "--export",
                      str(tmp_path / "r18.pth"), "--output-dir", str(tmp_path)])
    assert "torchvision.models.resnet18() loads it with strict=False (only fc.* missing)" in capsys.readouterr().out
    state = torch.load(tmp_path / "r18.pth", weights_only=True)
    result = models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    source = torch.load(moco_checkpoint, weights_only=True)["state_dict"]
    # every tensor, BN statistics included, and the same features from the plain torchvision model
    assert len(state) == 120
    assert all(torch.equal(value, source["module.encoder_q." + key]) for key, value in state.items())
    net = models.resnet18()
    net.load_state_dict(state, strict=False)
    net.fc = torch.nn.Identity()
    backbone, _ = linear_eval.load_backbone(str(moco_checkpoint), "resnet18", "auto", log=lambda line: None)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), backbone.eval()(x), rtol=0, atol=0)
    assert not (tmp_path / "checkpoint.pth.tar").exists()  # --export trains nothing
