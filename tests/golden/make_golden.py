"""Golden outputs of `mimlab probe`, `pretrain` and `transfer` on fixed random-init cases, through the CLI only.

Written once from the commit before the redesign (81a369f, 2026-12-07) with

    python tests/golden/make_golden.py --write tests/golden/golden.json

and checked by tests/test_golden.py, which recomputes every case with the code at hand and compares it with the
stored numbers (1e-10 relative for the probe's torch path, bit-identical for the training curves) on a machine like
the one that wrote them. float32 matmuls round differently on another CPU (other vector units, other GEMM
kernels: seen between the machine that wrote golden.json (its CPU was not recorded) and an AVX2-only AMD EPYC, up to 2.3e-6 relative
at bootstrap interval ends and 1.2e-7 in training losses), so elsewhere golden.json is compared at 1e-5 relative
and a machine's own values, written with `--write-exact tests/golden/exact`, are compared exactly. The CLI is the
interface that must not change, so the cases call `mimlab.cli.main` and read the files it writes.

Each probe case builds a tiny model of one family with a fixed seed, sharpens its attention (q and k weights x4,
so the statistics are not those of near-uniform attention), saves it as a checkpoint in its timm layout (or as a
Hugging Face directory) and probes it on 8 built-in images.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch

TINY = "img_size=32,patch_size=4,depth=2,embed_dim=64,num_heads=4"

# name -> (arch, model kwargs, extra timm kwargs for building the file)
PROBE_CASES: dict[str, tuple[str, str]] = {
    "vit": ("vit_tiny_patch16_224", TINY),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TINY),
    "vit_reg4": ("vit_tiny_patch16_224", TINY + ",reg_tokens=4"),
    "beit": ("beit_base_patch16_224", TINY + ",use_abs_pos_emb=False,use_rel_pos_bias=True"),
    "swin": ("swin_tiny_patch4_window7_224",
             "img_size=32,patch_size=2,window_size=4,embed_dim=32,depths=(2,2),num_heads=(2,4)"),
    "swinv2": ("swinv2_tiny_window8_256",
               "img_size=32,patch_size=2,window_size=4,embed_dim=32,depths=(2,2),num_heads=(2,4)"),
}
HF_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=4, qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu")
PRETRAIN_DATA = "builtin:fractal-leaves?classes=4&per_class=8&seed=0"


def _sharpen(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                p.mul_(4.0)
            if name.endswith("q_bias"):
                p.normal_(0, 0.5)
    return model


def _cli(argv: list[str]) -> None:
    from mimlab.cli import main

    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"mimlab {' '.join(argv)} exited {rc}")


def _timm_file(arch: str, kwargs: str, path: Path, seed: int) -> Path:
    import timm

    from mimlab.models.factory import parse_model_kwargs
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = _sharpen(timm.create_model(arch, pretrained=False, num_classes=0, **parse_model_kwargs(kwargs)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _hf_dir(path: Path, seed: int) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = _sharpen(transformers.ViTModel(transformers.ViTConfig(**HF_VIT), add_pooling_layer=False)).eval()
    model.save_pretrained(str(path))
    return path


def _probe_numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a metrics.json that must not change: per-head values and CIs per layer, and CKA."""
    out: dict[str, Any] = {"num_images": metrics["num_images"], "models": {}, "cka": metrics["cka"]}
    for label, m in metrics["models"].items():
        layers = []
        for layer in m["layers"]:
            keep = {k: layer[k] for k in ("attention_distance_px", "attention_distance_norm", "head_kl", "head_js",
                                          "entropy", "prefix_mass", "nmi")}
            if "ci" in layer:
                keep["ci"] = {k: v for k, v in layer["ci"].items() if k in keep}
            layers.append(keep)
        out["models"][label] = {"layers": layers, "uniform_distance_px": m.get("uniform_distance_px"),
                                "num_prefix_tokens": m["num_prefix_tokens"], "grid": m["grid"]}
    return out


def probe_case(name: str, work: Path, kernel: str = "torch", dtype: str = "float32") -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    common = ["--data", "builtin", "--images", "8", "--batch-size", "4", "--workers", "0", "--bootstrap", "20",
              "--stats-kernel", kernel, "--stats-dtype", dtype, "--no-report", "--quiet"]
    out = work / f"probe_{name}_{kernel}_{dtype}"
    if name == "hf_vit":
        d = _hf_dir(work / "hf_vit", seed=3)
        _cli(["probe", f"m=hf:{d}", *common, "--out", str(out)])
    else:
        arch, kwargs = PROBE_CASES[name]
        f = _timm_file(arch, kwargs, work / f"{name}.safetensors", seed=1)
        _cli(["probe", f"m={arch}@{f}", "--model-kwargs", kwargs, *common, "--out", str(out)])
    return _probe_numbers(json.loads((out / "metrics.json").read_text()))


def probe_pair_case(work: Path) -> dict[str, Any]:
    """Two models in one run (cross-model CKA, shared bootstrap weights)."""
    work.mkdir(parents=True, exist_ok=True)
    arch, kwargs = PROBE_CASES["vit"]
    a = _timm_file(arch, kwargs, work / "pair_a.safetensors", seed=5)
    b = _timm_file(arch, kwargs, work / "pair_b.safetensors", seed=6)
    out = work / "probe_pair"
    _cli(["probe", f"a={arch}@{a}", f"b={arch}@{b}", "--model-kwargs", kwargs, "--data", "builtin", "--images", "12",
          "--batch-size", "6", "--workers", "0", "--bootstrap", "20", "--stats-kernel", "torch", "--no-report",
          "--quiet", "--out", str(out)])
    return _probe_numbers(json.loads((out / "metrics.json").read_text()))


def _losses(csv_path: Path) -> list[float]:
    with open(csv_path) as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def pretrain_case(method: str, work: Path) -> dict[str, Any]:
    arch, kwargs = PROBE_CASES["vit"]
    out = work / f"pretrain_{method}"
    _cli(["pretrain", "--method", method, "--model", arch, "--model-kwargs", kwargs, "--data", PRETRAIN_DATA,
          "--out", str(out), "--steps", "6", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--threads", "1",
          "--no-tensorboard", "--no-progress"])
    return {"losses": _losses(out / "metrics.csv")}


def transfer_case(work: Path) -> dict[str, Any]:
    arch, kwargs = PROBE_CASES["vit"]
    data = work / "fg"
    _cli(["data", "finegrained", "--out", str(data), "--num-classes", "3", "--train-per-class", "8",
          "--val-per-class", "4", "--size", "32"])
    f = _timm_file(arch, kwargs, work / "transfer_backbone.safetensors", seed=2)
    out = work / "transfer_classify"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                    # the golden was written with one thread; the caller's count after
    try:
        _cli(["transfer", "--task", "classify", "--backbone", f"bb={arch}@{f}", "--model-kwargs", kwargs,
              "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "8", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    m = json.loads((out / "metrics.json").read_text())
    return {"metrics": m["metrics"], "baseline": m["baseline"], "losses": _losses(out / "metrics.csv")}


def all_cases() -> dict[str, Callable[[Path], dict[str, Any]]]:
    cases: dict[str, Callable[[Path], dict[str, Any]]] = {}
    for name in [*PROBE_CASES, "hf_vit"]:
        cases[f"probe/{name}"] = lambda w, n=name: probe_case(n, w)
    cases["probe/vit_float64"] = lambda w: probe_case("vit", w, dtype="float64")
    cases["probe/pair"] = probe_pair_case
    for method in ("simmim", "mae", "supervised"):
        cases[f"pretrain/{method}"] = lambda w, m=method: pretrain_case(m, w)
    cases["transfer/classify"] = transfer_case
    return cases


def max_rel_diff(a: Any, b: Any, path: str = "") -> tuple[float, str]:
    """Largest |a - b| / max(|b|, 1e-30) over matching numbers of two JSON trees (inf if the structure differs)."""
    if isinstance(b, dict):
        if not isinstance(a, dict) or set(a) != set(b):
            return math.inf, f"{path}: keys differ"
        worst = (0.0, "")
        for k in b:
            worst = max(worst, max_rel_diff(a[k], b[k], f"{path}/{k}"))
        return worst
    if isinstance(b, list):
        if not isinstance(a, list) or len(a) != len(b):
            return math.inf, f"{path}: lengths differ"
        worst = (0.0, "")
        for i, (x, y) in enumerate(zip(a, b)):
            worst = max(worst, max_rel_diff(x, y, f"{path}[{i}]"))
        return worst
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        if not isinstance(a, (int, float)):
            return math.inf, f"{path}: not a number"
        if math.isnan(b) or math.isnan(a):
            return (0.0, "") if math.isnan(a) and math.isnan(b) else (math.inf, f"{path}: NaN")
        if a == b:
            return 0.0, ""
        return abs(a - b) / max(abs(b), 1e-30), path
    return (0.0, "") if a == b else (math.inf, f"{path}: {a!r} != {b!r}")


ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "asimd", "sve")


def machine_signature() -> dict[str, Any]:
    """What float32 results depend on besides the code: the CPU (its model and vector ISA: the GEMM kernels
    oneDNN / MKL pick differ, and so do the last bits of every matmul), torch and the thread count."""
    import platform

    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"arch": platform.machine(), "cpu": model, "isa": [f for f in ISA_FLAGS if f in flags],
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def signature_key(sig: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", help="write the golden JSON here")
    p.add_argument("--write-exact", metavar="DIR",
                   help="write this machine's values to DIR/<signature>.json (compared exactly on this machine)")
    p.add_argument("--only", nargs="*", default=None, help="case names (default all)")
    args = p.parse_args(argv)
    cases = all_cases()
    names = args.only or list(cases)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = cases[name](Path(tmp) / name.replace("/", "_"))
            print(f"{name}: done", file=sys.stderr)
    results["_machine"] = machine_signature()
    if args.write:
        Path(args.write).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.write_exact:
        path = Path(args.write_exact) / f"{signature_key(results['_machine'])}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
