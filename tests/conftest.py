"""Test helpers: import the scripts as modules, run 2-process gloo groups, run the real command lines."""
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture
def one_thread(monkeypatch):
    """Two cores shared with other jobs: one intra-op thread per process avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocesses of run_script
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, *args, world_size: int = 2, timeout: float = 120):
    """Runs fn(rank, world_size, *args) in `world_size` spawned processes joined by a gloo group.
    fn must be a module-level function; it reports by writing files (e.g. into a tmp_path). A group
    still running after `timeout` seconds is killed, every rank, and the test fails."""
    context = mp.start_processes(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"{world_size} gloo ranks still running after {timeout} s: killed")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def ddp(model):
    """DDP as the scripts' Run.start wraps a model: buffers not sent every step (forward_sync_buffers=False, or
    broadcast_buffers=False before torch had that name)."""
    sync = next(k for k in ("forward_sync_buffers", "broadcast_buffers")
                if k in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters)
    return torch.nn.parallel.DistributedDataParallel(model, **{sync: False})


def _run_workers(rank: int, world_size: int, jobs):
    for fn, out_dir in jobs:
        fn(rank, world_size, out_dir)
        dist.barrier()  # both ranks leave one worker before either starts the next


def pytest_configure(config):
    config.addinivalue_line("markers", "gloo_worker(worker=fn): the test reads what fn(rank, world_size, out_dir) "
                                       "wrote on 2 gloo ranks; out_dir is the gloo_dir fixture (conftest.py)")


def _worker_key(fn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


@pytest.fixture(scope="session")
def _gloo_runs(request, tmp_path_factory):
    """Every worker named by a selected test's gloo_worker mark, run one after another in one 2-process gloo group:
    one start-up of two processes (≈ 6.5 s each importing torch) for the session, not one per test."""
    workers = {}
    for item in request.session.items:
        for mark in item.iter_markers("gloo_worker"):
            workers[_worker_key(mark.kwargs["worker"])] = mark.kwargs["worker"]
    root = tmp_path_factory.mktemp("gloo")
    jobs = [(fn, root / key) for key, fn in workers.items()]
    for _, out_dir in jobs:
        out_dir.mkdir()
    run_distributed(_run_workers, jobs)
    return {key: out_dir for key, (_, out_dir) in zip(workers, jobs)}


@pytest.fixture
def gloo_dir(request, _gloo_runs):
    """The folder the test's gloo_worker wrote into on both ranks (its own folder; the worker ran once)."""
    return _gloo_runs[_worker_key(request.node.get_closest_marker("gloo_worker").kwargs["worker"])]


def run_script(script: str, *args, nproc: int = 0, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    """The real command line: `python X.py ...`, or `torchrun --standalone --nproc_per_node=N X.py ...`, in a session
    of its own: at `timeout` seconds the whole process group (torchrun, every rank, loader workers) is killed and
    the test fails with the last lines each stream printed."""
    launcher = [sys.executable] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.Popen(launcher + [str(ROOT / script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{script} still running after {timeout} s: killed its process group. Last output:\n"
                    + "\n".join(stdout.splitlines()[-10:] + stderr.splitlines()[-10:]))
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(autouse=True)
def signal_handlers():
    """A script's main() catches SIGTERM, SIGUSR1 and SIGINT while it trains (Preemption) and gives them back
    when it ends or stops; a run that fails half-way leaves them set: put them back after every test."""
    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    handlers = [signal.getsignal(s) for s in signals]
    yield
    for s, handler in zip(signals, handlers):
        signal.signal(s, handler)
