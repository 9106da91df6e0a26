"""No traceback ever reaches the user (issue 16), for all seven scripts: flags out of range, failed and
unreadable checkpoints, a read-only output folder, no network, Ctrl-C. Each case runs main(argv) in-process
as `python X.py argv` ends (SystemExit's status and message; any other exception fails the test, as it
would have printed a traceback) and checks a non-zero exit, one line naming the flag, and an existing
checkpoint byte for byte. Training is replaced by a stub where a case needs an epoch to end: the cases
are about the scaffold around it."""
import errno
import inspect
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import warnings

import pytest
import torch
import torchvision.models as models

import byol
import cmc
import common
import insdis
import linear_eval
import moco
import simclr
import simsiam
from conftest import ROOT, free_port

MODULES = {"moco": moco, "simclr": simclr, "byol": byol, "simsiam": simsiam, "insdis": insdis, "cmc": cmc,
           "linear_eval": linear_eval}
TRAINING = [name for name in MODULES if name != "linear_eval"]
RUN = ["--data", "synthetic:16", "-a", "resnet18", "-b", "8", "--image-size", "8", "-j", "0", "-p", "100",
       "--epochs", "1", "--seed", "0"]
ARGV = {  # the smallest run of each script: 16 images, batch 8, 8 px, tiny heads
    "moco": RUN + ["--knn-every", "0", "--moco-k", "16", "--moco-dim", "8"],
    "simclr": RUN + ["--knn-every", "0", "--proj-out-dim", "8"],
    "byol": RUN + ["--knn-every", "0", "--dim", "8", "--hidden-dim", "8"],
    "simsiam": RUN + ["--knn-every", "0", "--dim", "8", "--pred-dim", "8"],
    "insdis": RUN + ["--knn-every", "0", "--nce-k", "4", "--feat-dim", "8"],
    "cmc": RUN + ["--knn-every", "0", "--nce-k", "4", "--feat-dim", "8"],
    "linear_eval": RUN,  # a random-weight resnet18 (the same with --seed 0)
}
OTHER_MODEL = {"moco": ["--moco-dim", "4"], "simclr": ["--proj-out-dim", "4"], "byol": ["--dim", "4"],
               "simsiam": ["--dim", "4"], "insdis": ["--feat-dim", "4"], "cmc": ["--feat-dim", "4"]}
PREVIOUS = b"the previous checkpoint"
pytestmark = pytest.mark.usefixtures("one_thread")


def no_training(*args, **kwargs):
    """train_one_epoch's stand-in: the epoch ends at once (with the τ BYOL saves)."""
    return {"epoch": 0, "loss": 0.0, "tau": 0.996}


def run(name, argv, capsys):
    """main(argv) as the interpreter ends it: (exit status, stdout, stderr)."""
    status, message = 0, ""
    try:
        MODULES[name].main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) or stop.code is None else 1
        message = stop.code if isinstance(stop.code, str) else ""
    out, err = capsys.readouterr()
    return status or 0, out, err + (message + "\n" if message else "")


def assert_one_line(status, err, name, expected_status, *words):
    assert status == expected_status, err
    assert "Traceback" not in err and "weights_only=False" not in err
    lines = err.strip().splitlines()
    if expected_status == 2:  # argparse: its usage, then one error line
        assert lines[-1].startswith(f"{name}.py: error: "), err
    else:
        assert len(lines) == 1 and lines[0].startswith(f"{name}.py: "), err
    for word in words:
        assert word in lines[-1], (word, lines[-1])


@pytest.fixture
def out(tmp_path):
    """An output folder that already holds a checkpoint: every case must leave it as it was."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pth.tar").write_bytes(PREVIOUS)
    return tmp_path / "out"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A real one-epoch checkpoint of each script (the epoch itself stubbed), and the run's stdout."""
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, module in MODULES.items():
            patch.setattr(module, "train_one_epoch", no_training)
            folder = tmp_path_factory.mktemp(name)
            module.main(ARGV[name] + ["--output-dir", str(folder)])
            runs[name] = folder
    return runs


# --------------------------------------------------------------------------------- flag ranges
SHARED = [  # (flag, value, what the error line says)
    ("-b", "0", "-b/--batch-size must be >= 1 (got 0)"),
    ("-b", "-16", "-b/--batch-size must be >= 1 (got -16)"),
    ("--lr", "-1", "--lr must be > 0 (got -1.0)"),
    ("--lr", "0", "--lr must be > 0"),
    ("--momentum", "1.5", "--momentum must be in [0, 1]"),
    ("--wd", "-1", "--wd must be >= 0"),
    ("-j", "-1", "-j/--workers must be >= 0 (got -1)"),
    ("--epochs", "0", "--epochs must be >= 1 (got 0)"),
    ("--start-epoch", "-1", "--start-epoch must be in [0, --epochs) (got -1)"),
    ("--start-epoch", "1", "--start-epoch must be in [0, --epochs) (got 1)"),  # --epochs 1
    ("-p", "0", "-p/--print-freq must be >= 1"),
    ("--save-every-steps", "-1", "--save-every-steps must be >= 0 (0: off) (got -1)"),
    ("--save-every-minutes", "-0.5", "--save-every-minutes must be >= 0 (0: off)"),
    ("--image-size", "0", "--image-size must be >= 1 (got 0)"),
    ("-a", "vit_b_16", "-a/--arch must be a torchvision ResNet: resnet18, resnet34, resnet50, resnet101, resnet152, "
                       "resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2 (got vit_b_16)"),
    ("-a", "alexnet", "-a/--arch must be a torchvision ResNet"),
    ("-a", "resnet_does_not_exist", "-a/--arch must be a torchvision ResNet"),
]
METHOD = {
    "moco": [("--moco-k", "0", "--moco-k must be >= 1"), ("--moco-m", "1.5", "--moco-m must be in [0, 1]"),
             ("--moco-t", "0", "--moco-t must be > 0"), ("--moco-dim", "0", "--moco-dim must be >= 1")],
    "simclr": [("--temperature", "0", "--temperature must be > 0"), ("--proj-out-dim", "0", "--proj-out-dim must be >= 1"),
               ("--color-jitter-strength", "3", "--color-jitter-strength must be in [0, 2.5]"),
               ("--blur-kernel", "-0.1", "--blur-kernel must be in [0, 1]"),
               ("--warmup-epochs", "-1", "--warmup-epochs must be >= 0")],
    "byol": [("--tau-base", "1.5", "--tau-base must be in [0, 1]"), ("--dim", "0", "--dim must be >= 1"),
             ("--hidden-dim", "0", "--hidden-dim must be >= 1"), ("--warmup-epochs", "-1", "--warmup-epochs must be >= 0")],
    "simsiam": [("--dim", "0", "--dim must be >= 1"), ("--pred-dim", "0", "--pred-dim must be >= 1")],
    "insdis": [("--nce-k", "0", "--nce-k must be >= 1"), ("--nce-t", "0", "--nce-t must be > 0"),
               ("--nce-m", "-0.5", "--nce-m must be in [0, 1]"), ("--feat-dim", "0", "--feat-dim must be >= 1"),
               ("--prox-lambda", "-1", "--prox-lambda must be >= 0")],
    "cmc": [("--nce-k", "0", "--nce-k must be >= 1"), ("--nce-t", "0", "--nce-t must be > 0"),
            ("--nce-m", "2", "--nce-m must be in [0, 1]"), ("--feat-dim", "0", "--feat-dim must be >= 1"),
            ("--crop-min", "0", "--crop-min must be in (0, 1]")],
    "linear_eval": [("--knn-k", "0", "--knn-k must be >= 1"), ("--knn-t", "0", "--knn-t must be > 0")],
}
FLAG_CASES = [(name, *case) for name in MODULES for case in SHARED + METHOD[name]]


@pytest.mark.parametrize("name, flag, value, message", FLAG_CASES,
                         ids=[f"{c[0]}{c[1]}={c[2]}" for c in FLAG_CASES])
def test_a_flag_out_of_range_is_one_argparse_line(name, flag, value, message, out, capsys):
    status, _, err = run(name, ARGV[name] + ["--output-dir", out, flag, value], capsys)
    assert_one_line(status, err, name, 2, message)
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


def test_resnets_are_the_torchvision_builders_of_a_resnet_and_the_helpers_one_text():
    builders = {n for n in models.list_models(module=models) if models.get_model_builder(n).__module__ == models.resnet.__name__}
    assert all(module.RESNETS == moco.RESNETS for module in MODULES.values()) and set(moco.RESNETS) == builders
    for helper in ("check_ranges", "prepare_output_dir", "save_checkpoint", "first_line", "read_checkpoint", "mismatch",
                   "load_checkpoint", "restore_checkpoint"):  # the scaffold: the same text in all seven scripts
        assert len({inspect.getsource(getattr(module, helper)) for module in MODULES.values()}) == 1, helper


@pytest.mark.parametrize("name", TRAINING)
def test_one_image_per_process_is_refused_for_batchnorm(name, out, capsys):
    status, _, err = run(name, ARGV[name] + ["--output-dir", out, "-b", "1"], capsys)
    assert_one_line(status, err, name, 1, "-b/--batch-size 1 leaves 1 image per process", "BatchNorm")


@pytest.mark.parametrize("name", MODULES)
def test_help_shows_the_defaults(name, capsys):
    with pytest.raises(SystemExit) as stop:
        MODULES[name].main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "data-loading workers per process (default: 8)" in text and "(default: ./runs/" in text
    if name != "linear_eval":  # the probe's epochs come from --protocol
        assert f"epochs to train in all (default: {MODULES[name].parse_args(['--data', 'x']).epochs})" in text


# ------------------------------------------------------------------------- saving and the folder
@pytest.mark.parametrize("name, error", [(name, "ENOSPC") for name in MODULES] + [("moco", "zip writer")])
def test_a_failed_save_keeps_the_previous_checkpoint_and_the_log(name, error, out, monkeypatch, capsys):
    (out / "log.txt").write_text('{"epoch": 0}\n')

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")  # what a write cut off by a full disk leaves
        if error == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(MODULES[name], "train_one_epoch", no_training)
    monkeypatch.setattr(torch, "save", full_disk)
    status, _, err = run(name, ARGV[name] + ["--output-dir", out], capsys)
    reason = "No space left on device" if error == "ENOSPC" else "(unexpected pos 64 vs 0;"  # torch's C++ location dropped
    assert_one_line(status, err, name, 1, "--output-dir: saving epoch 1 failed", reason,
                    f"the previous checkpoint '{out / 'checkpoint.pth.tar'}' is intact", "MiB free")
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS
    assert not (out / "checkpoint.pth.tar.tmp").exists()
    assert (out / "log.txt").read_text() == '{"epoch": 0}\n'  # the epoch is logged only once it is saved


@pytest.mark.parametrize("name", MODULES)
def test_a_read_only_output_dir_fails_before_any_epoch(name, out, monkeypatch, capsys):
    """Tests run as root, where a chmod does not stop writes: the file system's refusal is simulated."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def must_not_run(*args, **kwargs):
        raise AssertionError("an epoch ran before the folder was checked")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(MODULES[name], "train_one_epoch", must_not_run)
    status, _, err = run(name, ARGV[name] + ["--output-dir", out, "--resume", "auto"], capsys)
    assert_one_line(status, err, name, 1, f"--output-dir '{out}' is not writable: Read-only file system")
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


@pytest.mark.slow
@pytest.mark.parametrize("name", MODULES)
def test_a_finished_run_says_so_and_a_stray_tmp_is_removed(name, finished, tmp_path, capsys):
    shutil.copytree(finished[name], tmp_path / "run")
    before = (tmp_path / "run" / "checkpoint.pth.tar").read_bytes()
    (tmp_path / "run" / "checkpoint.pth.tar.tmp").write_bytes(b"left by a killed save")
    status, stdout, err = run(name, ARGV[name] + ["--output-dir", tmp_path / "run", "--resume", "auto"], capsys)
    assert status == 0 and "Traceback" not in err
    assert f"=> removed '{tmp_path / 'run' / 'checkpoint.pth.tar.tmp'}', left by a save that was cut off" in stdout
    assert "=> nothing to do: already at epoch 1 of 1; raise --epochs to train on" in stdout
    assert not (tmp_path / "run" / "checkpoint.pth.tar.tmp").exists()
    assert (tmp_path / "run" / "checkpoint.pth.tar").read_bytes() == before


def test_a_finished_run_ends_with_a_line_naming_the_checkpoint(tmp_path, monkeypatch, capsys):
    for name in ("moco", "linear_eval"):
        monkeypatch.setattr(MODULES[name], "train_one_epoch", no_training)
        status, stdout, _ = run(name, ARGV[name] + ["--output-dir", tmp_path / name], capsys)
        last = stdout.strip().splitlines()[-1]
        assert status == 0 and last.startswith("=> done: epoch 1 of 1" if name == "moco" else "=> linear probe: Acc@1")
        assert f"checkpoint '{tmp_path / name / 'checkpoint.pth.tar'}'" in last


# -------------------------------------------------------------------------------- reading
def garbage(kind: str) -> bytes:
    return {"empty": b"", "text": b"hello, not a checkpoint\n"}[kind]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("kind, why", [("empty", "the file is empty"), ("text", "not a torch.save file")])
def test_an_empty_or_text_checkpoint_is_one_line(name, kind, why, out, tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(garbage(kind))
    flag = "--pretrained" if name == "linear_eval" else "--resume"
    status, _, err = run(name, ARGV[name] + ["--output-dir", out, flag, tmp_path / "bad.pth"], capsys)
    assert_one_line(status, err, name, 1, f"{flag}: cannot read '{tmp_path / 'bad.pth'}' as a tensors-only checkpoint: {why}")
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING)
def test_a_mismatched_checkpoint_names_the_keys_and_shapes(name, finished, tmp_path, capsys):
    shutil.copytree(finished[name], tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pth.tar"
    before = path.read_bytes()
    status, _, err = run(name, ARGV[name] + OTHER_MODEL[name] + ["--epochs", "2", "--output-dir", path.parent,
                                                                 "--resume", "auto"], capsys)
    assert_one_line(status, err, name, 1, f"checkpoint '{path}' does not fit this model: ", "other shape ",
                    "vs (4,", "here", "it was saved with -a resnet18")
    assert len(err) < 500 and path.read_bytes() == before


@pytest.mark.slow
def test_a_pretrained_checkpoint_of_another_arch_names_the_keys(finished, out, capsys):
    path = finished["moco"] / "checkpoint.pth.tar"
    status, _, err = run("linear_eval", ARGV["linear_eval"] + ["-a", "resnet50", "--pretrained", path,
                                                               "--output-dir", out], capsys)
    assert_one_line(status, err, "linear_eval", 1, f"--pretrained: '{path}' (MoCo v1/v2 (ours or official)) does not "
                    "fit -a resnet50: missing ", "other shape ", "vs (64, 256, 1, 1) here")
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


# ------------------------------------------------------------------------------ linear_eval
@pytest.mark.slow
def test_a_probe_of_another_backbone_is_not_resumed(finished, tmp_path, capsys):
    """The default --output-dir is shared by every probe: a probe of random weights (seed 0) is not
    continued on the MoCo backbone, nor on random weights of another seed."""
    shutil.copytree(finished["linear_eval"], tmp_path / "probe")
    path = tmp_path / "probe" / "checkpoint.pth.tar"
    before = path.read_bytes()
    for other in (["--pretrained", finished["moco"] / "checkpoint.pth.tar"], ["--seed", "1"]):
        status, _, err = run("linear_eval", ARGV["linear_eval"] + other + ["--epochs", "2", "--output-dir", path.parent,
                                                                           "--resume", "auto"], capsys)
        assert_one_line(status, err, "linear_eval", 1, f"--resume: '{path}' is a probe of another backbone (random weights",
                        "give each probe its own --output-dir")
    assert path.read_bytes() == before


@pytest.mark.slow
def test_export_names_its_arch_and_reads_back_without_a(finished, tmp_path, capsys):
    moco_checkpoint = finished["moco"] / "checkpoint.pth.tar"
    linear_eval.main(["--data", "synthetic:16", "--pretrained", str(moco_checkpoint), "--export", str(tmp_path / "r18.pth")])
    assert "torchvision.models.resnet18() loads it" in capsys.readouterr().out
    backbone, _ = linear_eval.load_backbone(str(tmp_path / "r18.pth"), None, True)  # no -a: read from the tensors
    assert backbone.arch == "resnet18" and backbone.stem == "cifar"
    assert "torchvision ResNet state_dict, arch resnet18, cifar stem" in capsys.readouterr().out


@pytest.mark.slow
def test_export_to_a_full_disk_leaves_no_partial_file(finished, tmp_path, monkeypatch, capsys):
    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    status, _, err = run("linear_eval", ["--data", "synthetic:16", "--pretrained", finished["moco"] / "checkpoint.pth.tar",
                                         "--export", tmp_path / "r18.pth"], capsys)
    assert_one_line(status, err, "linear_eval", 1, f"--export: cannot write '{tmp_path / 'r18.pth'}'", "No space left")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_knn_and_probe_show_progress_and_epochs(finished, tmp_path, capsys):
    argv = ARGV["linear_eval"] + ["-p", "1", "--pretrained", finished["moco"] / "checkpoint.pth.tar"]
    status, stdout, _ = run("linear_eval", argv + ["--knn"], capsys)
    assert status == 0 and "Features (val): [0/2]" in stdout and "Features (train): [1/2]" in stdout
    status, stdout, _ = run("linear_eval", argv + ["--epochs", "2", "--output-dir", tmp_path], capsys)
    assert status == 0 and "Epoch: [1/2][1/2]" in stdout and " * Acc@1 " in stdout and "(epoch 1)" in stdout


# ----------------------------------------------------------------------- network and Ctrl-C
@pytest.mark.parametrize("name", MODULES)
def test_cifar10_without_network_is_one_line_and_leaves_no_empty_data_folder(name, out, tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    argv = [a for a in ARGV[name] if a != "synthetic:16"]
    argv[argv.index("--data") + 1] = "cifar10"
    status, _, err = run(name, argv + ["--output-dir", out], capsys)
    assert_one_line(status, err, name, 1, "--data cifar10: cannot download it into --data-root './data'",
                    "Temporary failure in name resolution")
    assert not (tmp_path / "data").exists()
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


@pytest.mark.parametrize("name", MODULES)
def test_ctrl_c_is_one_line(name, out, monkeypatch, capsys):
    """The script's own `__main__` block, run in this process; Ctrl-C arrives while the data is read."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "build_dataset", interrupted)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *ARGV[name], "--output-dir", str(out)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / f"{name}.py"), run_name="__main__")
    assert_one_line(stop.value.code, capsys.readouterr().err, name, 130, "interrupted")
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_is_one_line(out):
    """A real SIGINT to the whole process group, as a terminal sends it."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "moco.py"), *ARGV["moco"], "--epochs", "50",
                             "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal: a
    # suite started in the background (`cmd &` in a script) would hand its SIGINT-ignored disposition down
    for line in proc.stdout:  # (with -j 2 and the signal during an epoch it is the same line, ~10 s later)
        if line.startswith("=> creating model"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 75:  # on a loaded machine the signal can land after the run set its stop handlers
        assert err.strip() == "" and "continue with --resume auto" in out, (out, err)  # then: a checkpoint, no traceback
    else:  # the usual case: during start-up, before the loop
        assert proc.returncode == 130 and err.strip() == "moco.py: interrupted; the checkpoints saved so far are intact", err


# ------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("name", TRAINING)
def test_ddp_wrapping_warns_nothing(name, tmp_path, monkeypatch, capsys):
    """Each torchrun rank printed a FutureWarning: newer torch deprecates broadcast_buffers for
    forward_sync_buffers. A one-process group runs the scripts' DDP path."""
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1"), monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setattr(MODULES[name], "train_one_epoch", no_training)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, _, err = run(name, ARGV[name] + ["--output-dir", tmp_path], capsys)
    assert status == 0, err
    assert not [w for w in caught if "broadcast_buffers" in str(w.message)]
    assert json.loads((tmp_path / "log.txt").read_text())["epoch"] == 0
