"""No traceback ever reaches the user: every bad input of docs/errors.md ends in one line and a non-zero exit, and an
existing checkpoint stays byte for byte. One case per distinct error: the scaffold is one text in every script
(tests/test_scaffold.py), so what it reports is checked in one script; what each script words itself, in each. A case
runs main(argv) in-process as `python X.py argv` ends (SystemExit's status and message; any other exception fails the
test, as it would have printed a traceback), or the script's own `__main__` block (`cli`) where the guard is what is
tested. Training is stubbed where a case only needs an epoch to end."""
import errno
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
PREVIOUS = b"the previous checkpoint"
pytestmark = pytest.mark.usefixtures("one_thread")


def no_training(*args, **kwargs):
    """train_one_epoch's stand-in: the epoch ends at once (with the τ BYOL logs)."""
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


def cli(name, argv, capsys, monkeypatch):
    """The script's own `__main__` block, in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, argv)])
    status, message = 0, ""
    try:
        runpy.run_path(str(ROOT / f"{name}.py"), run_name="__main__")
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
    """A real one-epoch checkpoint (the epoch itself stubbed) of a script, made when first asked for."""
    runs = {}

    def get(name):
        if name not in runs:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(MODULES[name], "train_one_epoch", no_training)
                runs[name] = tmp_path_factory.mktemp(name)
                MODULES[name].main(ARGV[name] + ["--output-dir", str(runs[name])])
        return runs[name]
    return get


# --------------------------------------------------------------------------------------------------- flags
# every script: one flag of its own and the shared global batch; each kind of range once
FLAG_CASES = [(name, "-b", "0", "argument -b/--batch-size: must be in [1, inf] (got 0)") for name in MODULES] + [
    ("moco", "--moco-k", "0", "argument --moco-k: must be in [1, inf] (got 0)"),
    ("moco", "--moco-t", "0", "argument --moco-t: must be in (0, inf] (got 0)"),
    ("moco", "--momentum", "1.5", "argument --momentum: must be in [0, 1] (got 1.5)"),
    ("moco", "-j", "-1", "argument -j/--workers: must be in [0, inf] (got -1)"),
    ("moco", "-b", "x", "argument -b/--batch-size: invalid numeric value: 'x'"),
    ("moco", "-a", "vit_b_16", "argument -a/--arch: invalid choice: 'vit_b_16'"),
    ("simclr", "--color-jitter-strength", "3", "argument --color-jitter-strength: must be in [0, 2.5] (got 3)"),
    ("byol", "--tau-base", "1.5", "argument --tau-base/--base-target-ema: must be in [0, 1] (got 1.5)"),
    ("simsiam", "--pred-dim", "0", "argument --pred-dim: must be in [1, inf] (got 0)"),
    ("insdis", "--prox-lambda", "-1", "argument --prox-lambda: must be in [0, inf] (got -1)"),
    ("cmc", "--crop-min", "0", "argument --crop-min/--crop_low: must be in (0, 1] (got 0)"),
    ("linear_eval", "--knn-t", "0", "argument --knn-t: must be in (0, inf] (got 0)"),
]


@pytest.mark.parametrize("name, flag, value, message", FLAG_CASES, ids=[f"{c[0]}{c[1]}={c[2]}" for c in FLAG_CASES])
def test_a_flag_out_of_range_is_one_argparse_line(name, flag, value, message, out, capsys):
    status, _, err = run(name, ARGV[name] + ["--output-dir", out, flag, value], capsys)
    assert_one_line(status, err, name, 2, message)
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


@pytest.mark.parametrize("name", MODULES)
def test_the_official_multi_process_flags_point_to_torchrun(name, capsys):
    for flag in (["--dist-url", "tcp://x:1"], ["--multiprocessing-distributed"], ["--gpu", "0"], ["--world-size", "1"],
                 ["--rank", "0"]):
        with pytest.raises(SystemExit):
            MODULES[name].parse_args(["--data", "synthetic", *flag])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert flag[0] in line and line.endswith("are gone: launch with torchrun"), line


@pytest.mark.parametrize("name", MODULES)
def test_help_shows_the_defaults(name, capsys):
    with pytest.raises(SystemExit) as stop:
        MODULES[name].main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "data-loading workers per process (default: 8)" in text and "(default: ./runs/" in text
    if name != "linear_eval":  # the probe's epochs come from --protocol
        assert f"epochs to train in all (default: {MODULES[name].parse_args(['--data', 'x']).epochs})" in text


@pytest.mark.parametrize("name", TRAINING)
def test_one_image_per_process_is_refused_for_batchnorm(name, out, capsys):
    status, _, err = run(name, ARGV[name] + ["--output-dir", out, "-b", "1"], capsys)
    assert_one_line(status, err, name, 1, "-b 1 leaves 1 image per process, fewer than")


def test_a_global_batch_that_does_not_divide_by_the_world_size(out, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    status, _, err = run("simclr", ARGV["simclr"] + ["--output-dir", out], capsys)
    assert_one_line(status, err, "simclr", 1, "global batch 8 does not divide by the world size 3")


# ------------------------------------------------------------------------------------- saving and the folder
@pytest.mark.parametrize("error", ["ENOSPC", "zip writer"])
def test_a_failed_save_keeps_the_previous_checkpoint_and_the_log(error, out, monkeypatch, capsys):
    (out / "log.txt").write_text('{"epoch": 0}\n')

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")  # what a write cut off by a full disk leaves
        if error == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(moco, "train_one_epoch", no_training)
    monkeypatch.setattr(torch, "save", full_disk)
    status, _, err = run("moco", ARGV["moco"] + ["--output-dir", out], capsys)
    reason = "OSError: [Errno 28] No space left on device" if error == "ENOSPC" else "RuntimeError: [enforce fail"
    assert_one_line(status, err, "moco", 1, f"cannot write '{out / 'checkpoint.pth.tar'}', the previous one is whole",
                    reason)
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS
    assert not (out / "checkpoint.pth.tar.tmp").exists()  # the partial file is gone, its space given back
    assert (out / "log.txt").read_text() == '{"epoch": 0}\n'  # the epoch is logged only once it is saved


@pytest.mark.parametrize("name", ["moco", "linear_eval"])
def test_a_read_only_output_dir_fails_before_any_epoch(name, out, monkeypatch, capsys):
    """Tests run as root, where a chmod does not stop writes: the file system's refusal is simulated."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def must_not_run(*args, **kwargs):
        raise AssertionError("an epoch ran before the folder was checked")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(MODULES[name], "train_one_epoch", must_not_run)
    status, _, err = run(name, ARGV[name] + ["--output-dir", out, "--resume", "auto"], capsys)
    assert_one_line(status, err, name, 1, f"--output-dir '{out}' is not writable: OSError: [Errno 30] Read-only")
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


@pytest.mark.parametrize("name", ["moco", "linear_eval"])
def test_a_finished_run_resumed_again_changes_nothing_and_names_its_checkpoint(name, finished, tmp_path, capsys):
    shutil.copytree(finished(name), tmp_path / "run")
    before = (tmp_path / "run" / "checkpoint.pth.tar").read_bytes()
    status, stdout, err = run(name, ARGV[name] + ["--output-dir", tmp_path / "run", "--resume", "auto"], capsys)
    last = stdout.strip().splitlines()[-1]
    assert status == 0 and "Traceback" not in err
    assert last.startswith("=> done: epoch 1 of 1" if name == "moco" else "=> linear probe: Acc@1")
    assert f"checkpoint '{tmp_path / 'run' / 'checkpoint.pth.tar'}'" in last
    assert (tmp_path / "run" / "checkpoint.pth.tar").read_bytes() == before


# ------------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("kind, why", [("empty", "EOFError"), ("text", "KeyError"), ("missing", "FileNotFoundError"),
                                       ("code", "UnpicklingError")])
def test_a_file_that_is_no_tensors_only_checkpoint_is_one_line(kind, why, out, tmp_path, capsys):
    path = tmp_path / "bad.pth"
    if kind == "code":  # torch.save of an object: loading it would run code
        torch.save({"state_dict": {}, "hook": shutil.copytree}, path)
    elif kind != "missing":
        path.write_bytes({"empty": b"", "text": b"hello, not a checkpoint\n"}[kind])
    for name, flag in (("simsiam", "--resume"), ("linear_eval", "--pretrained")):
        status, _, err = run(name, ARGV[name] + ["--output-dir", out, flag, path], capsys)
        assert_one_line(status, err, name, 1, f"{flag}: cannot read '{path}' as a tensors-only checkpoint: {why}")
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


def test_a_checkpoint_of_another_method_is_refused(tmp_path, capsys):
    torch.save({"method": "moco", "state_dict": {}, "epoch": 3}, tmp_path / "other.pth.tar")
    status, _, err = run("insdis", ARGV["insdis"] + ["--output-dir", tmp_path, "--resume", tmp_path / "other.pth.tar"],
                         capsys)
    assert_one_line(status, err, "insdis", 1, f"'{tmp_path / 'other.pth.tar'}' is not a insdis checkpoint (found: moco)")


def test_a_mismatched_checkpoint_names_the_keys_and_shapes(finished, tmp_path, capsys):
    shutil.copytree(finished("byol"), tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pth.tar"
    before = path.read_bytes()
    status, _, err = run("byol", ARGV["byol"] + ["--dim", "4", "--epochs", "2", "--output-dir", path.parent,
                                                 "--resume", "auto"], capsys)
    assert_one_line(status, err, "byol", 1, "the checkpoint does not fit: Error(s) in loading state_dict for BYOL",
                    "size mismatch for", "copying a param with shape torch.Size([8, 8]) from checkpoint")
    assert len(err) < 600 and path.read_bytes() == before


@pytest.mark.slow
def test_a_pretrained_checkpoint_of_another_arch_names_the_keys(finished, out, capsys):
    path = finished("moco") / "checkpoint.pth.tar"
    status, _, err = run("linear_eval", ARGV["linear_eval"] + ["-a", "resnet50", "--pretrained", path,
                                                               "--output-dir", out], capsys)
    assert_one_line(status, err, "linear_eval", 1, f"--pretrained: '{path}' (MoCo v1/v2 (ours or official)) does not "
                    "fit -a resnet50: ", "Missing key(s)", "size mismatch")
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


# --------------------------------------------------------------------------------------------- linear_eval
def test_a_probe_of_another_backbone_is_not_resumed(finished, tmp_path, capsys):
    """The default --output-dir is shared by every probe: a probe of random weights (seed 0) is not continued on
    the MoCo backbone, nor on random weights of another seed."""
    shutil.copytree(finished("linear_eval"), tmp_path / "probe")
    path = tmp_path / "probe" / "checkpoint.pth.tar"
    before = path.read_bytes()
    for other in (["--pretrained", finished("moco") / "checkpoint.pth.tar"], ["--seed", "1"]):
        status, _, err = run("linear_eval", ARGV["linear_eval"] + other + ["--epochs", "2", "--output-dir", path.parent,
                                                                           "--resume", "auto"], capsys)
        assert_one_line(status, err, "linear_eval", 1, "--resume: the checkpoint is a probe of another backbone "
                        "(random weights); give each probe its own --output-dir")
    assert path.read_bytes() == before


def test_export_to_a_full_disk_leaves_no_partial_file(finished, tmp_path, monkeypatch, capsys):
    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    (tmp_path / "out").mkdir()
    status, _, err = run("linear_eval", ["--data", "synthetic:16", "--pretrained", finished("moco") / "checkpoint.pth.tar",
                                         "--export", tmp_path / "out" / "r18.pth", "--output-dir", tmp_path], capsys)
    assert_one_line(status, err, "linear_eval", 1, f"cannot write '{tmp_path / 'out' / 'r18.pth'}'", "No space left")
    assert os.listdir(tmp_path / "out") == []


def test_detectron2_export_needs_a_pkl_and_torchvision_stem(finished, tmp_path, capsys):
    status, _, err = run("linear_eval", ["--data", "synthetic:16", "--export", tmp_path / "x.pth",
                                         "--export-format", "detectron2"], capsys)
    assert_one_line(status, err, "linear_eval", 2, "needs --export PATH ending in .pkl")
    status, _, err = run("linear_eval", ["--data", "synthetic:16", "--pretrained", finished("moco") / "checkpoint.pth.tar",
                                         "--export", tmp_path / "x.pkl", "--export-format", "detectron2",
                                         "--output-dir", tmp_path], capsys)
    assert_one_line(status, err, "linear_eval", 1, "the CIFAR stem (3×3 conv1, no max-pool) has no detectron2")


# -------------------------------------------------------------------------------- data, network and Ctrl-C
def test_cifar10_without_network_is_one_line_and_leaves_no_empty_data_folder(out, tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    argv = [a if a != "synthetic:16" else "cifar10" for a in ARGV["byol"]]
    status, _, err = cli("byol", argv + ["--output-dir", out], capsys, monkeypatch)
    assert_one_line(status, err, "byol", 1, "--data cifar10: cannot download it into --data-root './data'",
                    "Temporary failure in name resolution")
    assert not (tmp_path / "data").exists()
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


@pytest.mark.parametrize("name", ["cmc", "linear_eval"])
def test_a_missing_or_empty_data_folder_is_one_line(name, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    for folder, why in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no images")):
        argv = [a if a != "synthetic:16" else folder for a in ARGV[name]]
        status, _, err = cli(name, argv + ["--output-dir", tmp_path / "out"], capsys, monkeypatch)
        assert_one_line(status, err, name, 1, f"data folder '{folder}", why)


def test_fewer_images_than_the_global_batch_is_one_line(tmp_path, capsys, monkeypatch):
    argv = [a if a != "synthetic:16" else "synthetic:12" for a in ARGV["simclr"]] + ["-b", "16"]
    status, _, err = cli("simclr", argv + ["--output-dir", tmp_path], capsys, monkeypatch)
    assert_one_line(status, err, "simclr", 1, "the data has 12 images, fewer than the global batch 16")


@pytest.mark.parametrize("name", ["moco", "linear_eval"])
def test_ctrl_c_is_one_line(name, out, monkeypatch, capsys):
    """The script's own `__main__` block; Ctrl-C arrives while the data is read."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "build_dataset", interrupted)
    status, _, err = cli(name, ARGV[name] + ["--output-dir", out], capsys, monkeypatch)
    assert_one_line(status, err, name, 130, "interrupted; the checkpoints saved so far are intact")
    assert (out / "checkpoint.pth.tar").read_bytes() == PREVIOUS


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_is_one_line(out):
    """A real SIGINT to the whole process group, as a terminal sends it."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "moco.py"), *ARGV["moco"], "--epochs", "50",
                             "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal: a
    # suite started in the background (`cmd &` in a script) would hand its SIGINT-ignored disposition down
    try:
        for line in proc.stdout:
            if line.startswith("=> creating model"):
                break
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode == 75:  # on a loaded machine the signal can land after the run set its stop handlers
        assert err.strip() == "" and "continue with --resume auto" in out, (out, err)  # then: a checkpoint, no traceback
    else:  # the usual case: during start-up, before the loop
        assert proc.returncode == 130 and err.strip() == "moco.py: interrupted; the checkpoints saved so far are intact", err


# ---------------------------------------------------------------------------------------------------- DDP
def test_ddp_wrapping_warns_nothing(tmp_path, monkeypatch, capsys):
    """Newer torch deprecates broadcast_buffers for forward_sync_buffers: each torchrun rank printed a FutureWarning.
    A one-process group runs the scripts' DDP path (the wrapping is the SCAFFOLD's, one text in every script)."""
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1"), monkeypatch.setenv("MASTER_PORT", str(free_port()))
    wrapped = []
    real = moco.train_one_epoch

    def record(loader, model, *args):
        wrapped.append(type(model).__name__)
        return no_training()

    monkeypatch.setattr(moco, "train_one_epoch", record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, _, err = run("moco", ARGV["moco"] + ["--output-dir", tmp_path], capsys)
    assert status == 0, err
    assert wrapped == ["DistributedDataParallel"] and real is not record
    assert not [w for w in caught if "buffers" in str(w.message)]
    assert json.loads((tmp_path / "log.txt").read_text())["epoch"] == 0
