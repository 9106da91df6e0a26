"""Per-step overhead of each method over the backbone passes it cannot avoid.

For every method, one full training step exactly as the script's train_one_epoch does it (forward,
loss, meters, backward, optimiser step, EMA / queue / bank update), built from the script's own
classes and functions, without the data loader; divided by the time of the plain torchvision
ResNet passes the method needs anyway, on the same batch, in the same process and threads:

    MoCo     one forward+backward (queries) and one forward without grad (keys)
    SimCLR   one forward+backward of the 2N batch: the script runs both views in one
             concatenated pass (SimCLR.forward), so that is its floor
    BYOL     two forward+backward (online, one per view) and two forwards without grad (target)
    SimSiam  two forward+backward, one per view
    InsDis   one forward+backward
    CMC      forward+backward of its two encoders (1-channel L and 2-channel ab inputs)

The floor is `models.__dict__[arch](num_classes=dim)`, the network a script builds before it
swaps in its head, in train mode; it takes no optimiser step, so the ratio counts heads,
optimiser, EMA, queue/bank work and Python overhead alike. Repetitions are interleaved (step,
floor, step, floor, ...) after warm-up; ratio = median(step) / median(floor). The last column
times the optimiser step alone: a cost per parameter, the same at any batch size, so the part of
the overhead that a larger per-device batch amortises.

    python benchmarks/overhead.py                         # all methods, resnet18, batch 32, 32 px
    python benchmarks/overhead.py --methods moco insdis -b 64 --reps 20
    python benchmarks/overhead.py --smoke                 # seconds: checks that everything runs
"""
import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn as nn
import torchvision.models as models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import common  # noqa: E402

BANK_N = 5000  # InsDis/CMC memory bank rows (one per "image")
NCE_K = 4096  # InsDis/CMC noise samples per positive
MOCO_K = 4096  # MoCo queue size
STEPS_PER_EPOCH = 100  # for the per-step lr / τ schedules (SimCLR, BYOL); the value does not change the cost


def script_args(module, args, *extra):
    """The script's own defaults (its parse_args), with the benchmark's arch, batch and image size."""
    return module.parse_args(["--data", "synthetic", "-a", args.arch, "-b", str(args.batch_size),
                              "--image-size", str(args.image_size), *extra])


def backbone(module, a):
    """The script's own base encoder, `resnet(arch, stem)`, with torchvision's stem: the floor's network."""
    return partial(module.resnet, a.arch, "imagenet")


def plain_resnet(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    net = models.__dict__[arch](num_classes=num_classes)
    if in_channels != 3:  # CMC's encoders: same stem, fewer input channels
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def floor_step(nets_with_grad, nets_no_grad):
    """Forward+backward of each (net, input) in nets_with_grad as one graph (one backward, as the
    scripts do), and a forward without grad of each (net, input) in nets_no_grad."""
    def step():
        for net, _ in nets_with_grad:
            net.zero_grad(set_to_none=True)
        out = sum(net(x).sum() for net, x in nets_with_grad)
        with torch.no_grad():
            for net, x in nets_no_grad:
                net(x)
        out.backward()
    return step


# ------------------------------------------------------------------------------------------ methods
# Each builder returns (step, optimizer, floor): two closures over the same inputs, and the step's
# optimiser. The step bodies copy the scripts' train_one_epoch loops line for line, less the loader
# and the time meters.
def build_moco(args, device, x1, x2, index):
    import moco
    a = script_args(moco, args, "--moco-k", str(MOCO_K))
    model = moco.MoCo(backbone(moco, a), a.moco_dim, a.moco_k, a.moco_m, a.moco_t, a.mlp).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), a.lr, momentum=a.momentum, weight_decay=a.wd)
    losses, top1, top5 = common.AverageMeter("Loss"), common.AverageMeter("Acc@1"), common.AverageMeter("Acc@5")

    def step():
        logits, labels, k = model(x1, x2)
        loss = moco.infonce_loss(logits, labels)
        acc1, acc5 = common.accuracy(logits, labels, topk=(1, 5))
        losses.update(loss, x1.shape[0]), top1.update(acc1, x1.shape[0]), top5.update(acc5, x1.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model._dequeue_and_enqueue(k)  # the script's getattr(model, "module", model): no DDP here

    net = plain_resnet(a.arch, a.moco_dim).to(device).train()
    return step, optimizer, floor_step([(net, x1)], [(net, x2)])


def build_simclr(args, device, x1, x2, index):
    import simclr
    a = script_args(simclr, args)
    model = simclr.SimCLR(backbone(simclr, a), a.proj_out_dim).to(device).train()
    a.init_lr = a.lr * (a.batch_size / 256 if a.lr_scaling == "linear" else math.sqrt(a.batch_size))  # as main()
    optimizer = simclr.LARS(simclr.lars_param_groups(model), a.init_lr, a.momentum, a.wd)
    losses, top1, top5 = common.AverageMeter("Loss"), common.AverageMeter("Acc@1"), common.AverageMeter("Acc@5")
    counter = [0]

    def step():
        i = counter[0] % STEPS_PER_EPOCH
        counter[0] += 1
        simclr.adjust_learning_rate(optimizer, 0 + i / STEPS_PER_EPOCH, a)
        z1, z2 = model(x1, x2)
        loss, logits, labels = simclr.nt_xent_loss(z1, z2, a.temperature)
        acc1, acc5 = common.accuracy(logits, labels, topk=(1, 5))
        losses.update(loss, logits.shape[0]), top1.update(acc1, logits.shape[0]), top5.update(acc5, logits.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    net = plain_resnet(a.arch, a.proj_out_dim).to(device).train()
    both = torch.cat([x1, x2])  # the floor's input is made once: the script's torch.cat counts as overhead
    return step, optimizer, floor_step([(net, both)], [])


def build_byol(args, device, x1, x2, index):
    import byol
    a = script_args(byol, args)
    model = byol.BYOL(backbone(byol, a), a.dim, a.hidden_dim, a.zero_init_basic).to(device).train()
    a.init_lr = a.lr * a.batch_size / 256
    optimizer = byol.LARS(byol.lars_param_groups(model), a.init_lr, momentum=a.momentum, weight_decay=a.wd)
    losses, taus, p_stds = common.AverageMeter("Loss"), common.AverageMeter("Tau"), common.AverageMeter("Std(p)")
    total_steps = a.epochs * STEPS_PER_EPOCH
    counter = [0]

    def step():
        s = counter[0] % total_steps
        counter[0] += 1
        byol.adjust_learning_rate(optimizer, s, STEPS_PER_EPOCH, a)
        p1, p2, z1, z2 = model(x1, x2)
        loss = byol.byol_loss(p1, p2, z1, z2)
        losses.update(loss, x1.shape[0])
        p_stds.update(byol.prediction_std(p1), x1.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tau = byol.target_tau(s, total_steps, a.tau_base)
        model._update_target_network(tau)
        taus.update(tau)

    net = plain_resnet(a.arch, a.dim).to(device).train()
    return step, optimizer, floor_step([(net, x1), (net, x2)], [(net, x1), (net, x2)])


def build_simsiam(args, device, x1, x2, index):
    import simsiam
    a = script_args(simsiam, args)
    model = simsiam.SimSiam(backbone(simsiam, a), a.dim, a.pred_dim).to(device).train()
    a.init_lr = a.lr * a.batch_size / 256
    optimizer = torch.optim.SGD([{"params": model.encoder.parameters(), "fix_lr": False},
                                 {"params": model.predictor.parameters(), "fix_lr": a.fix_pred_lr}],
                                a.init_lr, momentum=a.momentum, weight_decay=a.wd)
    losses, z_stds = common.AverageMeter("Loss"), common.AverageMeter("Std(z)")

    def step():
        p1, p2, z1, z2 = model(x1, x2)
        loss = simsiam.simsiam_loss(p1, p2, z1, z2)
        losses.update(loss, x1.shape[0]), z_stds.update(simsiam.collapse_std(z1), x1.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    net = plain_resnet(a.arch, a.dim).to(device).train()
    return step, optimizer, floor_step([(net, x1), (net, x2)], [])


def build_insdis(args, device, x1, x2, index):
    import insdis
    a = script_args(insdis, args, "--nce-k", str(NCE_K))
    model = insdis.InsDis(backbone(insdis, a), BANK_N, a.feat_dim, a.nce_k, a.nce_t, a.nce_m,
                          a.softmax).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), a.lr, momentum=a.momentum, weight_decay=a.wd)
    losses, probs = common.AverageMeter("Loss"), common.AverageMeter("Prob")
    n_data = model.n_data

    def step():
        out, f, v = model(x1, index)
        loss, prob = insdis.insdis_loss(out, f, v, n_data, a.softmax, a.prox_lambda)
        losses.update(loss, x1.shape[0]), probs.update(prob, x1.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model._update_memory(index, f.detach())

    net = plain_resnet(a.arch, a.feat_dim).to(device).train()
    return step, optimizer, floor_step([(net, x1)], [])


def build_cmc(args, device, x1, x2, index):
    import cmc
    a = script_args(cmc, args, "--nce-k", str(NCE_K))
    model = cmc.CMC(backbone(cmc, a), BANK_N, a.feat_dim, a.nce_k, a.nce_t, a.nce_m,
                    a.softmax).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), a.lr, momentum=a.momentum, weight_decay=a.wd)
    losses, l_prob, ab_prob = common.AverageMeter("Loss"), common.AverageMeter("l_p"), common.AverageMeter("ab_p")
    n_data = model.n_data

    def step():
        out_l, out_ab, f_l, f_ab = model(x1, index)
        loss, l_p, ab_p = cmc.cmc_loss(out_l, out_ab, n_data, a.softmax)
        losses.update(loss, x1.shape[0]), l_prob.update(l_p, x1.shape[0]), ab_prob.update(ab_p, x1.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model._update_memory(index, f_l, f_ab)

    net_l = plain_resnet(a.arch, a.feat_dim, in_channels=1).to(device).train()
    net_ab = plain_resnet(a.arch, a.feat_dim, in_channels=2).to(device).train()
    x_l, x_ab = x1[:, :1].contiguous(), x1[:, 1:].contiguous()  # the script's slicing counts as overhead
    return step, optimizer, floor_step([(net_l, x_l), (net_ab, x_ab)], [])


METHODS = {"moco": build_moco, "simclr": build_simclr, "byol": build_byol, "simsiam": build_simsiam,
           "insdis": build_insdis, "cmc": build_cmc}


# ------------------------------------------------------------------------------------------ timing
def timed(fn, device) -> float:
    """Seconds for one call, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(method: str, args, device) -> dict:
    torch.manual_seed(0)
    n, size = args.batch_size, args.image_size
    x1 = torch.randn(n, 3, size, size, device=device)
    x2 = torch.randn(n, 3, size, size, device=device)
    index = torch.randperm(BANK_N, device=device)[:n]  # distinct dataset indices, as a sampler gives
    step, optimizer, floor = METHODS[method](args, device, x1, x2, index)
    for _ in range(args.warmup):  # first calls: allocator, cudnn autotune, InsDis/CMC's one-off Z estimate
        step(), floor()
    step_times, floor_times = [], []
    for _ in range(args.reps):
        step_times.append(timed(step, device))
        floor_times.append(timed(floor, device))
    # The optimiser step alone (on the last step's gradients), after the interleaved pairs: its cost
    # grows with the parameters, not the batch, so it says how much of the overhead a larger
    # per-device batch would amortise.
    opt_ms = 1000 * statistics.median(timed(optimizer.step, device) for _ in range(args.reps))
    step_ms, floor_ms = 1000 * statistics.median(step_times), 1000 * statistics.median(floor_times)
    return {"method": method, "step_ms": step_ms, "floor_ms": floor_ms, "ratio": step_ms / floor_ms,
            "optimizer_ms": opt_ms}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="overhead.py", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("-a", "--arch", default="resnet18")
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=21, help="timed (step, floor) pairs per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed (step, floor) pairs first")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="batch 8, 16 px, 1 rep, no warm-up: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.image_size, args.reps, args.warmup = 8, 16, 1, 0
    if MOCO_K % args.batch_size and "moco" in args.methods:
        parser.error(f"-b {args.batch_size}: MoCo's K={MOCO_K} must be a multiple of the batch")
    if args.batch_size > BANK_N:
        parser.error(f"-b {args.batch_size}: larger than the {BANK_N}-row memory bank")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the scripts without --seed

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    rows = []
    try:
        for method in args.methods:
            rows.append(measure(method, args, device))
            print(f"{method}: step {rows[-1]['step_ms']:.1f} ms, floor {rows[-1]['floor_ms']:.1f} ms",
                  file=sys.stderr, flush=True)
    finally:  # main() may run inside another process (the tests): leave its thread count as it was
        args.threads = torch.get_num_threads()
        torch.set_num_threads(threads)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"\n{datetime.date.today()}, {device.type} ({name}), torch {torch.__version__}, "
          f"{args.threads} threads, -a {args.arch}, batch {args.batch_size}, {args.image_size} px, "
          f"{args.reps} reps (median)\n")
    print("| method | step ms | floor ms | ratio | of which optimiser ms |\n| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['method']} | {row['step_ms']:.1f} | {row['floor_ms']:.1f} | {row['ratio']:.3f} "
              f"| {row['optimizer_ms']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
