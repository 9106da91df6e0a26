"""Preemption and resume (README: Preemption and resume), parametrized over the scripts: a stop signal
ends a run after the step in flight with a checkpoint of (epoch, step), and `--resume auto` continues
it bit for bit; periodic checkpoints change nothing; kill -9 while a checkpoint is written keeps the
previous one; torchrun forwards SIGTERM so both ranks stop at one step, and restarts a group whose
rank was killed, which continues from the last checkpoint."""
import glob
import os
import random
import signal
import subprocess
import sys
import threading

import pytest
import torch

import byol
import common
import insdis
import linear_eval
import moco
import simclr
import test_byol
import test_insdis
import test_moco
import test_simclr
from conftest import ROOT, run_script

# Two epochs of a few 16 px steps each; each script brings the state a mid-epoch resume must carry over.
SMALL = ["--image-size", "16"]
RUNS = {
    "moco": (moco, test_moco.TINY + SMALL + ["--data", "synthetic:96"], 3),  # queue + pointer, shuffle's randperm
    "simclr": (simclr, test_simclr.TINY + SMALL, 4),  # per-step warm-up/cosine lr, LARS buffers
    "byol": (byol, test_byol.TINY, 4),  # τ and lr by global step, target network
    "insdis": (insdis, test_insdis.TINY + SMALL + ["--data", "synthetic:96"], 3),  # memory bank, Z, NCE noise draw
    "linear_eval": (linear_eval, ["--data", "synthetic:100", "-a", "resnet18", "--stem", "imagenet", "-b", "20",
                                  "-j", "0", "--seed", "0", "--lr", "1.0"], 5),  # the probe and best top-1
}
EPOCHS = ["--epochs", "2", "-p", "1"]  # -p 1: a progress line per step, the hook below counts them
pytestmark = pytest.mark.usefixtures("one_thread")


def run(name, out, *flags, stop_after=None):
    """main() of a script; with stop_after=g, SIGTERM arrives during global step g (0-based, counted by
    the progress lines) and the run must end with EXIT_STOPPED."""
    module, argv, _ = RUNS[name]
    argv = argv + EPOCHS + ["--output-dir", str(out), *flags]
    display, shown = common.ProgressMeter.display, []

    def display_then_signal(self, batch):  # the step's last act: its progress line
        display(self, batch)
        if not self.prefix.startswith("Epoch: "):  # linear_eval's feature extraction: not a step
            return
        shown.append(batch)
        if len(shown) == stop_after + 1:
            os.kill(os.getpid(), signal.SIGTERM)

    if stop_after is None:
        module.main(argv)
        return
    common.ProgressMeter.display = display_then_signal
    try:
        with pytest.raises(SystemExit) as stopped:
            module.main(argv)
    finally:
        common.ProgressMeter.display = display
    assert stopped.value.code == 75  # sysexits EX_TEMPFAIL: run it again


def load(out):
    return torch.load(out / "checkpoint.pth.tar", weights_only=True)


def assert_same_run(a, b):
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # weights, BN statistics, queue, banks, Z, target network
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # lr of the last step
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # momentum / LARS buffers


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-epoch run of each script, made once."""
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]
            run(name, out)
            assert handlers == [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]
            runs[name] = load(out)
        return runs[name]
    return get


def mid_epoch_steps(name):
    steps = RUNS[name][2]
    return [g for g in range(2 * steps - 1) if (g + 1) % steps]  # a stop after g leaves the epoch unfinished


@pytest.mark.slow
@pytest.mark.parametrize("name, workers", [(n, "0") for n in RUNS] + [("moco", "2"), ("insdis", "2")])
def test_sigterm_at_a_random_step_then_resume_auto_equals_the_uninterrupted_run(name, workers, reference,
                                                                                 tmp_path, capsys):
    steps = RUNS[name][2]
    g = random.Random(f"{name}-{workers}").choice(mid_epoch_steps(name))  # seeded: the same step every time
    epoch, step = divmod(g + 1, steps)
    run(name, tmp_path, "-j", workers, stop_after=g)
    assert capsys.readouterr().out.strip().endswith(f"stopped at epoch {epoch} step {step}; continue with --resume auto")
    ckpt = load(tmp_path)
    assert (ckpt["epoch"], ckpt["step"]) == (epoch, step)
    run(name, tmp_path, "-j", workers, "--resume", "auto")
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch: [")]
    assert progress[0].startswith(f"Epoch: [{epoch}][{step}/{steps}]")  # the step count continues
    assert len(progress) == 2 * steps - (g + 1)  # and no step runs twice
    assert_same_run(load(tmp_path), reference(name))


@pytest.mark.slow
def test_a_signal_in_the_last_step_stops_at_the_epoch_boundary(reference, tmp_path, capsys):
    run("byol", tmp_path, stop_after=3)  # the last of epoch 0's 4 steps: the epoch ends as usual, then the run stops
    assert capsys.readouterr().out.strip().endswith("stopped at epoch 1 step 0; continue with --resume auto")
    ckpt = load(tmp_path)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)  # the epoch's own checkpoint, then the stop
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 1
    run("byol", tmp_path, "--resume", "auto")
    assert_same_run(load(tmp_path), reference("byol"))


@pytest.mark.slow
def test_periodic_checkpoints_change_nothing_and_land_where_asked(reference, tmp_path, monkeypatch):
    saved = []
    real = byol.save_checkpoint

    def record(state, path):
        saved.append((state["epoch"], state["step"]))
        real(state, path)

    monkeypatch.setattr(byol, "save_checkpoint", record)
    run("byol", tmp_path / "steps", "--save-every-steps", "2")  # 4 steps an epoch
    assert saved == [(0, 2), (1, 0), (1, 2), (2, 0)]
    assert_same_run(load(tmp_path / "steps"), reference("byol"))


@pytest.mark.slow
def test_mid_epoch_resume_refuses_another_global_batch(tmp_path):
    """The samples an epoch has seen are step × global batch: another -b would skip the wrong ones."""
    run("byol", tmp_path, stop_after=1)
    before = (tmp_path / "checkpoint.pth.tar").read_bytes()
    with pytest.raises(SystemExit) as err:
        run("byol", tmp_path, "--resume", "auto", "-b", "32")
    assert str(err.value) == "byol.py: the checkpoint stopped mid-epoch with -b 16: resume it with the same"
    assert (tmp_path / "checkpoint.pth.tar").read_bytes() == before


KILLED_WHILE_SAVING = """
import io, os, signal, sys, torch
sys.path.insert(0, {root!r})
import moco
real, saves = torch.save, []

def dies_halfway(obj, path):  # the second checkpoint: half of it reaches the disk, then SIGKILL
    saves.append(path)
    if len(saves) < 2:
        return real(obj, path)
    data = io.BytesIO()
    real(obj, data)
    with open(path, "wb") as f:
        f.write(data.getvalue()[:len(data.getvalue()) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dies_halfway
moco.main({argv!r})
"""


@pytest.mark.slow
def test_kill_9_while_a_checkpoint_is_written_leaves_the_previous_one(reference, tmp_path):
    argv = RUNS["moco"][1] + EPOCHS + ["--output-dir", str(tmp_path), "--save-every-steps", "1"]
    (tmp_path / "killed.py").write_text(KILLED_WHILE_SAVING.format(root=str(ROOT), argv=argv))
    proc = run_script(tmp_path / "killed.py", timeout=90)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "checkpoint.pth.tar.tmp").stat().st_size < (tmp_path / "checkpoint.pth.tar").stat().st_size
    assert (load(tmp_path)["epoch"], load(tmp_path)["step"]) == (0, 1)  # the first save, whole
    run("moco", tmp_path, "--resume", "auto")
    assert_same_run(load(tmp_path), reference("moco"))


def worker_pids(launcher_pid: int) -> dict:
    """RANK -> pid of the processes torchrun started."""
    pids = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                    continue
            pid = int(stat.split("/")[2])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
            pids[int(env[b"RANK"])] = pid
        except (OSError, KeyError, IndexError, ValueError):
            continue  # gone, or not a worker
    return pids


def torchrun(out, *flags, launcher=(), act, timeout=120):
    """torchrun, 2 processes, moco; act(line, proc) sees every stdout line. Returns (returncode, stdout, stderr). In a
    session of its own: a group still running at `timeout` seconds is killed, every rank, and the test fails."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *launcher,
            str(ROOT / "moco.py"), *test_moco.TINY, *SMALL, "--epochs", "1", "-p", "1", "--output-dir", str(out), *flags]
    # a restarted group must not share torchrun's store with the killed one (docs/preemption.md)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    lines, fired = [], []
    watchdog = threading.Timer(timeout, lambda: fired.append(os.killpg(proc.pid, signal.SIGKILL)))
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            act(line, proc)
        stderr = proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not fired, f"torchrun still running after {timeout} s: killed. Last output:\n{''.join(lines[-10:])}"
    return proc.returncode, "".join(lines), stderr


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
def test_torchrun_forwards_sigterm_and_restarts_a_group_whose_rank_was_killed(tmp_path):
    steps = 256 // 32  # test_moco.TINY: 256 images, global batch 32

    def terminate(line, proc):  # SIGTERM to torchrun, which forwards it to both workers
        if line.startswith(f"Epoch: [0][1/{steps}]"):
            proc.send_signal(signal.SIGTERM)

    code, stdout, stderr = torchrun(tmp_path, act=terminate)
    assert code != 0 and "Traceback" not in stdout
    assert stdout.count("stopped at epoch 0 step ") == 1, stdout + stderr  # one line, from rank 0
    ckpt = load(tmp_path)
    stopped = ckpt["step"]
    assert f"stopped at epoch 0 step {stopped}; continue with --resume auto" in stdout
    assert ckpt["epoch"] == 0 and 2 <= stopped < steps  # both ranks stopped at the step they agreed on

    killed = []

    def kill_rank_1(line, proc):  # kill -9 one rank once the resumed group has trained a step
        if not killed and line.startswith("Epoch: [0]"):
            killed.append(worker_pids(proc.pid)[1])
            os.kill(killed[0], signal.SIGKILL)

    code, stdout, stderr = torchrun(tmp_path, "--save-every-steps", "1", "--resume", "auto",
                                    launcher=["--max-restarts=1"], act=kill_rank_1)
    assert code == 0, stdout + stderr
    assert killed and stdout.count("=> loaded checkpoint") == 2  # the first start and the group torchrun restarted
    progress = [line for line in stdout.splitlines() if line.startswith("Epoch: [")]
    assert progress[0].startswith(f"Epoch: [0][{stopped}/{steps}]")
    assert progress[-1].startswith(f"Epoch: [0][{steps - 1}/{steps}]")
    assert (load(tmp_path)["epoch"], load(tmp_path)["step"]) == (1, 0)
