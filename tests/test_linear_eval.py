"""linear_eval.py: kNN, frozen backbone + sanity check, protocols, best/last top-1, checkpoint layouts,
export, errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as models

import common
import linear_eval
import moco
from conftest import run_script

DATA = ["--data", "synthetic:100", "-j", "0", "-b", "20", "--seed", "0"]


@pytest.fixture(scope="module")
def moco_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("moco")
    moco.main(["--data", "synthetic:128", "-a", "resnet18", "-b", "32", "--moco-k", "64", "-j", "0",
               "--epochs", "1", "--seed", "0", "--stem", "imagenet", "--knn-every", "0", "--output-dir", str(out)])
    return out / "checkpoint.pth.tar"


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
def test_sanity_check_passes_when_unchanged_and_fails_on_any_change():
    backbone = linear_eval.Backbone("resnet18")
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    linear_eval.sanity_check(backbone, reference)
    backbone.encoder.layer3[0].bn1.running_mean[0] += 1e-6  # BN statistics count too
    with pytest.raises(SystemExit, match="sanity check failed: backbone tensor 'encoder.layer3.0.bn1.running_mean'"):
        linear_eval.sanity_check(backbone, reference)


@pytest.mark.slow
def test_probe_trains_only_the_linear_layer(moco_checkpoint, tmp_path):
    metrics = linear_eval.main(DATA + ["--pretrained", str(moco_checkpoint), "--epochs", "2", "--lr", "1.0",
                                       "--output-dir", str(tmp_path)])
    assert 0.0 <= metrics["acc1"] <= 100.0 and metrics["epoch"] == 1
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["method"] == "linear" and set(ckpt["state_dict"]) == {"module.weight", "module.bias"}


@pytest.mark.slow
def test_probe_sanity_check_catches_a_moving_backbone(moco_checkpoint, tmp_path, monkeypatch):
    real = linear_eval.train_one_epoch

    def leaky(loader, backbone, *args):
        backbone.train()  # BN in train mode updates running statistics: the bug the check exists for
        with torch.no_grad():
            backbone(next(iter(loader))[0])
        return real(loader, backbone, *args)

    monkeypatch.setattr(linear_eval, "train_one_epoch", leaky)
    with pytest.raises(SystemExit, match="sanity check failed"):
        linear_eval.main(DATA + ["--pretrained", str(moco_checkpoint), "--epochs", "1", "--output-dir", str(tmp_path)])


@pytest.mark.slow
def test_knn_and_probe_from_the_command_line(moco_checkpoint, tmp_path):
    proc = run_script("linear_eval.py", *DATA, "--pretrained", moco_checkpoint, "--knn")
    assert proc.returncode == 0, proc.stderr
    assert "MoCo v1/v2 (ours or official), arch resnet18, imagenet stem; used 120 keys (module.encoder_q.)" in proc.stdout
    assert "module.encoder_k.* (122)" in proc.stdout and "=> kNN (k=200, T=0.07): Acc@1" in proc.stdout
    proc = run_script("linear_eval.py", *DATA, "--pretrained", moco_checkpoint, "--epochs", "1",
                      "--output-dir", tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr
    assert "sanity check passed" in proc.stdout and proc.stdout.count(" * Acc@1") == 1


@pytest.mark.slow
def test_simsiam_protocol_is_the_official_main_lincls(moco_checkpoint, tmp_path):
    """facebookresearch/simsiam main_lincls.py: lr 0.1 × batch/256 (App. A says 0.02; issue #13: the
    released models used 0.1), batch 4096, 90 epochs, cosine, wd 0, LARS (apex LARC) on both parameters."""
    args = linear_eval.parse_args(["--data", "synthetic", "--protocol", "simsiam"])
    assert (args.lr, args.batch_size, args.epochs, args.wd, args.optimizer, args.cos) == (0.1, 4096, 90, 0.0, "lars", True)
    args = linear_eval.parse_args(["--data", "synthetic", "--protocol", "simsiam", "--epochs", "3"])
    assert args.epochs == 3  # explicit flags win
    linear_eval.main(DATA + ["--pretrained", str(moco_checkpoint), "--protocol", "simsiam", "--epochs", "1",
                             "--output-dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["args"]["init_lr"] == pytest.approx(0.1 * 20 / 256)


def test_simsiam_protocol_adapts_the_bias_too_as_apex_larc():
    """LARC adapts every parameter whose weight and gradient norms are non-zero: the bias (0 at the
    start) takes a plain momentum-SGD step first, then η‖b‖/‖g‖-scaled ones like the weight."""
    classifier = torch.nn.Linear(2, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[0.3, -0.4], [0.0, 0.5]]))
        classifier.bias.zero_()
    args = linear_eval.parse_args(["--data", "synthetic", "--protocol", "simsiam"])
    args.init_lr = 0.5
    optimizer = linear_eval.build_optimizer(classifier, args)
    assert len(optimizer.param_groups) == 1 and not optimizer.param_groups[0]["lars_exclude"]
    b, v_b, eta, m = torch.zeros(2), torch.zeros(2), 0.001, 0.9
    for g_b in (torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])):
        classifier.weight.grad, classifier.bias.grad = torch.ones(2, 2), g_b.clone()
        optimizer.step()
        trust = eta * b.norm() / g_b.norm() if b.norm() > 0 else 1.0
        v_b = m * v_b + trust * g_b
        b = b - 0.5 * v_b
        torch.testing.assert_close(classifier.bias.detach(), b)
    assert b.abs().max() > 0.5  # the first step was not scaled by η


@pytest.mark.slow
def test_probe_reports_last_and_best_epoch_and_keeps_best_over_resume(tmp_path, capsys):
    """The official main_lincls.py keeps the best epoch's top-1 (and saves it); we print and return
    it beside the last one, which stays `acc1` and starts the final line."""
    probe = DATA + ["-a", "resnet18", "--lr", "0.1", "--output-dir", str(tmp_path)]  # here: 10, 15, 10, 10 %
    linear_eval.main(probe + ["--epochs", "3"])
    metrics = linear_eval.main(probe + ["--epochs", "4", "--resume", "auto"])
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    accs = [entry["acc1"] for entry in log]
    assert len(accs) == 4 and metrics["acc1"] == accs[-1]
    assert metrics["best_acc1"] == max(accs) and metrics["best_epoch"] == accs.index(max(accs))
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith(f"=> linear probe: Acc@1 {accs[-1]:.2f} Acc@5 ")
    assert f"best Acc@1 {max(accs):.2f} (epoch {accs.index(max(accs))})" in last_line and "sanity check passed" in last_line
    assert torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["best_acc1"] == max(accs)


@pytest.mark.slow
def test_random_init_baseline_estimates_its_bn_statistics_on_the_training_images(tmp_path, monkeypatch):
    seen = []
    estimate = linear_eval.estimate_bn_statistics
    monkeypatch.setattr(linear_eval, "estimate_bn_statistics", lambda *a: (seen.append(a[0]), estimate(*a)))
    metrics = linear_eval.main(DATA + ["-a", "resnet18", "--knn", "--output-dir", str(tmp_path)])
    assert 0.0 <= metrics["knn_acc1"] <= 100.0
    assert len(seen) == 1 and seen[0].encoder.bn1.num_batches_tracked > 0  # the floor is calibrated
    linear_eval.main(DATA + ["-a", "resnet18", "--pretrained", str(_random_checkpoint(tmp_path)), "--knn"])
    assert len(seen) == 1  # a pre-trained backbone keeps the statistics it was trained with


def _random_checkpoint(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(models.resnet18().state_dict(), path)
    return path


def test_bn_statistics_are_the_exact_mean_and_variance_of_the_images_and_weights_stay():
    torch.manual_seed(0)
    backbone = linear_eval.Backbone("resnet18", stem="imagenet")
    weights = {k: v.clone() for k, v in backbone.state_dict().items() if "running" not in k and "tracked" not in k}
    images = torch.randn(12, 3, 32, 32) * 2 + 1
    loader = [(images[:6], None), (images[6:], None)]  # two equal batches
    linear_eval.estimate_bn_statistics(backbone, loader, torch.device("cpu"))
    bn1 = backbone.encoder.bn1
    with torch.no_grad():
        conv = [backbone.encoder.conv1(x) for x, _ in loader]
    mean = torch.stack([c.mean((0, 2, 3)) for c in conv]).mean(0)
    var = torch.stack([c.var((0, 2, 3), unbiased=True) for c in conv]).mean(0)  # torch's running_var is unbiased
    assert torch.allclose(bn1.running_mean, mean, atol=1e-5) and torch.allclose(bn1.running_var, var, rtol=1e-4)
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in weights.items())
    assert not backbone.training and bn1.momentum == 0.1


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
               "module.base_encoder.fc.0.weight": torch.randn(4096, 512), "module.predictor.0.weight": torch.randn(256, 4096)}
    return body, {
        "MoCo v1/v2": ({"epoch": 200, "arch": "resnet18", "state_dict": moco_v2, "optimizer": {}}, "module.encoder_q."),
        "SimSiam": ({"epoch": 100, "arch": "resnet18", "state_dict": simsiam, "optimizer": {}}, "module.encoder."),
        "MoCo v3": ({"epoch": 100, "arch": "resnet18", "state_dict": moco_v3, "optimizer": {}, "scaler": {}}, "module.base_encoder."),
        "torchvision": ({**body, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}, "no prefix"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MoCo v1/v2", "SimSiam", "MoCo v3", "torchvision"])
def test_official_checkpoints_load_with_the_right_keys(name, tmp_path, capsys):
    body, layouts = official_layouts()
    ckpt, prefix = layouts[name]
    torch.save(ckpt, tmp_path / "ckpt.pth")
    backbone, reference = linear_eval.load_backbone(str(tmp_path / "ckpt.pth"), "resnet18", is_main=True)
    for key, value in body.items():  # every backbone tensor came from the checkpoint, heads dropped
        assert torch.equal(backbone.encoder.state_dict()[key], value), key
    out = capsys.readouterr().out
    assert f"used {len(body)} keys ({prefix})" in out
    state = ckpt.get("state_dict", ckpt)
    assert f"ignored {len(state) - len(body)}:" in out


class NotATensor:  # a pickled object: code a checkpoint must never run
    pass


def test_pickled_objects_unknown_layouts_and_wrong_arch_are_refused(tmp_path):
    torch.save({"state_dict": resnet18_state(), "extra": NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(SystemExit, match="cannot read .* as a tensors-only checkpoint"):
        linear_eval.load_backbone(str(tmp_path / "pickled.pth"), "resnet18", True)
    torch.save({"state_dict": {"backbone.stem.weight": torch.zeros(1)}}, tmp_path / "unknown.pth")
    with pytest.raises(SystemExit, match=r"has no known backbone layout .*; key prefixes found: backbone\.\* \(1\)"):
        linear_eval.load_backbone(str(tmp_path / "unknown.pth"), "resnet18", True)
    torch.save(resnet18_state(), tmp_path / "r18.pth")
    with pytest.raises(SystemExit, match="does not fit -a resnet34"):
        linear_eval.load_backbone(str(tmp_path / "r18.pth"), "resnet34", True)
    with pytest.raises(SystemExit, match="--pretrained: no checkpoint at"):
        linear_eval.load_backbone(str(tmp_path / "missing.pth"), "resnet18", True)


@pytest.mark.slow
def test_export_loads_into_torchvision_with_only_fc_missing(moco_checkpoint, tmp_path):
    linear_eval.main(["--data", "synthetic:100", "--pretrained", str(moco_checkpoint), "--export", str(tmp_path / "r18.pth")])
    state = torch.load(tmp_path / "r18.pth", weights_only=True)
    result = models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    source = torch.load(moco_checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(state["layer4.1.conv2.weight"], source["module.encoder_q.layer4.1.conv2.weight"])
    # every tensor, BN statistics included, and the same features from the plain torchvision model
    assert all(torch.equal(value, source["module.encoder_q." + key]) for key, value in state.items())
    net = models.resnet18()
    net.load_state_dict(state, strict=False)
    net.fc = torch.nn.Identity()
    backbone, _ = linear_eval.load_backbone(str(moco_checkpoint), "resnet18", is_main=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), backbone.eval()(x), rtol=0, atol=0)
