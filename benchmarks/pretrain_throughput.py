"""Pretraining throughput (img/s): SimMIM, MAE and supervised against a plain timm training loop.

Three measurements on the same model, batch, precision and device, in one process:

* ``timm``         -- a plain loop: timm model with a classifier, cross-entropy, backward, fused AdamW, on one fixed
                      batch already on the device (the reference);
* ``<method>-step`` -- the same loop around mimlab's wrapper (mask token, decoder, masked loss), fixed batch;
* ``<method>-e2e``  -- the real thing: `mimlab.engine.train` with the per-sample seeded augmentation, masks,
                      DataLoader, grad clipping, logging (in-memory random uint8 images, so no image decoding).

Each step-loop number is the median over ``--repeats`` timed blocks of ``--steps`` steps after ``--warmup``
steps (compilation included in the warmup); the blocks of all step loops are interleaved so that load changes
on a shared machine hit all alike. Each e2e number is the median of the engine's per-interval img/s over
``--repeats`` intervals of ``--steps`` steps after a first excluded interval (run after the step loops).

CPU small preset (default):  python benchmarks/pretrain_throughput.py
GPU (ViT-B/16 at 224, bf16): python benchmarks/pretrain_throughput.py --device cuda --model vit_base_patch16_224 \
                                 --model-kwargs "" --batch-size 256 --precision bf16 --compile
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

SMALL_PRESET = "img_size=32,patch_size=4,depth=6,embed_dim=128,num_heads=4"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--model-kwargs", default=SMALL_PRESET)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fp8", action="store_true",
                   help="also time every step loop with the blocks' linear layers in float8 (mimlab.models.fp8)")
    p.add_argument("--steps", type=int, default=8, help="steps per timed block")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="simmim,mae,supervised")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end engine runs")
    p.add_argument("--no-step", action="store_true", help="skip the fixed-batch method loops")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for e2e (default: mimlab's auto)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steppers: dict[str, Callable[[], None]], device, *, batch: int, steps: int, warmup: int,
                     repeats: int) -> dict[str, dict]:
    """Median img/s of each stepper; the timed blocks are interleaved (A B C A B C ...) so that a change in the
    machine's load during the run affects every configuration alike."""
    for name, step in steppers.items():
        t = time.perf_counter()
        for _ in range(warmup):
            step()
        sync(device)
        print(f"warm-up of {name} (compilation included): {time.perf_counter() - t:.1f} s", file=sys.stderr,
              flush=True)
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, step in steppers.items():
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            rates[name].append(batch * steps / (time.perf_counter() - t))
    return {name: {"img_per_s": statistics.median(r), "all": [round(x, 1) for x in r]} for name, r in rates.items()}


def build_method(method: str, arch: str, kwargs: dict, num_classes: int):
    from mimlab.models.factory import create_model
    from mimlab.pretrain.mae import MAE
    from mimlab.pretrain.simmim import SimMIM
    from mimlab.pretrain.supervised import Supervised

    enc, _ = create_model(arch, kwargs, num_classes=num_classes if method == "supervised" else 0)
    return {"simmim": SimMIM, "mae": MAE, "supervised": Supervised}[method](enc)


def fixed_inputs(method: str, net, batch: int, img: tuple[int, int], device):
    import numpy as np
    import torch

    from mimlab.pretrain.masking import MaskGeometry, choose_mask_patch_size

    x = torch.randn(batch, 3, *img, device=device)
    if method == "simmim":
        p = net.geom["patch_size"]
        geom = MaskGeometry(img, p, choose_mask_patch_size(img, p), 0.6)
        rng = np.random.default_rng(0)
        mask = torch.from_numpy(np.stack([geom.sample(rng) for _ in range(batch)])).to(device)
        return lambda n: n(x, mask)
    if method == "mae":
        noise = torch.rand(batch, net.num_tokens, device=device)
        return lambda n: n(x, noise)
    y = torch.randint(0, 100, (batch,), device=device)
    return lambda n: (torch.nn.functional.cross_entropy(n(x).float(), y), {})


def make_stepper(net, forward: Callable, args, device, fp8: bool = False) -> Callable[[], None]:
    """One training step (autocast forward, backward, fused AdamW) of `net` on a fixed batch."""
    import torch

    from mimlab.engine import autocast_context, build_adamw, param_groups_weight_decay
    from mimlab.models.fp8 import convert_linears_to_fp8

    net.to(device).train()
    if fp8:
        convert_linears_to_fp8(net)
    opt = build_adamw(param_groups_weight_decay(net, 0.05), lr=1e-4)
    run_net = torch.compile(net) if args.compile else net
    amp = autocast_context(args.precision, device)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None

    def step() -> None:
        with amp:
            loss, _ = forward(run_net)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def e2e(method: str, args, kwargs: dict, img: tuple[int, int]) -> dict:
    import csv

    import numpy as np

    from mimlab.engine import TrainConfig, train
    from mimlab.pretrain import data as D
    from mimlab.pretrain.api import auto_workers, method_loss
    from mimlab.pretrain.masking import MaskGeometry, choose_mask_patch_size

    net = build_method(method, args.model, kwargs, 100)
    n = max(4 * args.batch_size, 512)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, *img, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, size=n)
    mask_fn, tokens = None, 0
    if method == "simmim":
        p = net.geom["patch_size"]
        mask_fn = MaskGeometry(img, p, choose_mask_patch_size(img, p), 0.6).sample
    elif method == "mae":
        tokens = net.num_tokens
    ds = D.PretrainDataset(D.ArraySource(images, labels), D.Augment(img, D.CROP_SCALE[method]),
                           target=method, mask_fn=mask_fn, num_tokens=tokens)
    workers = args.workers if args.workers is not None else auto_workers(True, args.device)
    loss_fn = method_loss(method, 100)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out_dir=tmp, steps=args.steps * (args.repeats + 1), batch_size=args.batch_size, lr=1e-4,
                          clip_grad=5.0, precision=args.precision, compile=args.compile, device=args.device,
                          num_workers=workers, log_every=args.steps, tensorboard=False, progress=False,
                          overwrite=True)
        train(net, loss_fn, ds, cfg)
        with open(os.path.join(tmp, "metrics.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    per_interval = [float(r["img_per_s"]) for r in rows[args.steps - 1::args.steps]][1:]
    return {"img_per_s": statistics.median(per_interval), "all": per_interval, "workers": workers}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from mimlab.engine import resolve_device
    from mimlab.models.factory import create_model, parse_model_kwargs
    from mimlab.utils.provenance import provenance

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    kwargs = parse_model_kwargs(args.model_kwargs)
    methods = [m for m in args.methods.split(",") if m]
    ref, _ = create_model(args.model, kwargs, num_classes=100)
    img = tuple(int(s) for s in ref.patch_embed.img_size)
    print(f"{args.model} {kwargs} at {img[0]}x{img[1]}, batch {args.batch_size}, {args.precision}, "
          f"compile={args.compile}, device {device} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", file=sys.stderr)
    results: dict[str, Any] = {}

    x = torch.randn(args.batch_size, 3, *img, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    timm_fwd = lambda n: (torch.nn.functional.cross_entropy(n(x).float(), y), {})  # noqa: E731
    steppers = {"timm": make_stepper(ref, timm_fwd, args, device)}
    if args.fp8:
        ref8, _ = create_model(args.model, kwargs, num_classes=100)
        steppers["timm-fp8"] = make_stepper(ref8, timm_fwd, args, device, fp8=True)
    if not args.no_step:
        for m in methods:
            net = build_method(m, args.model, kwargs, 100)
            steppers[f"{m}-step"] = make_stepper(net, fixed_inputs(m, net, args.batch_size, img, device), args, device)
            if args.fp8:
                net8 = build_method(m, args.model, kwargs, 100)
                steppers[f"{m}-step-fp8"] = make_stepper(net8, fixed_inputs(m, net8, args.batch_size, img, device),
                                                         args, device, fp8=True)
    results.update(time_interleaved(steppers, device, batch=args.batch_size, steps=args.steps, warmup=args.warmup,
                                    repeats=args.repeats))
    for name, r in results.items():
        print(f"{name}: {r['img_per_s']:.1f} img/s", file=sys.stderr)
    del steppers
    if not args.no_e2e:
        for m in methods:
            results[f"{m}-e2e"] = e2e(m, args, kwargs, img)
            print(f"{m}-e2e: {results[f'{m}-e2e']['img_per_s']:.1f} img/s", file=sys.stderr)

    base = results["timm"]["img_per_s"] if "timm" in results else float("nan")
    print(f"\n{'run':<18}{'img/s':>10}{'vs timm':>10}   repeats")
    for name, r in results.items():
        print(f"{name:<18}{r['img_per_s']:>10.1f}{r['img_per_s'] / base:>10.2f}   {r['all']}")
    info = provenance(load_average=os.getloadavg(), cpus=os.cpu_count(), threads=torch.get_num_threads())
    out = {"args": vars(args), "image_size": img, "device": str(device), "results": results, "provenance": info}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
