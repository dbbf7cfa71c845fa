#!/usr/bin/env bash
# All GPU checks in one call (at most ~7.5 minutes on one H100: the step limits add up to 440 s), then a short table of targets:
#   probe (ViT-B/16 @ 224, bf16): fused-kernel statistics vs plain fused forward, target >= 0.8x, error <= 1e-3
#   pretraining (ViT-B/16 @ 224, bf16, and with float8 matmuls): SimMIM >= 4500 img/s, MAE >= 6000, supervised >= 4500
#   (the plain timm loop stands for supervised: it is the same step)
# Usage (from the repo root, on the GPU machine):  bash benchmarks/gpu_check.sh
# Results land in $OUT (default /tmp/gpu_check) as JSON + logs; copy the numbers into benchmarks/RESULTS.md.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then   # pinned pure-Python wheels carried to the device (timm)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__)"
date -u +%FT%TZ

step() { local name=$1 limit=$2; shift 2; echo; echo "=== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; tail -n 25 "$OUT/$name.log"
  echo "--- $name: exit $rc, $((SECONDS - t0)) s"; }

step probe_kernel 110 python3 benchmarks/gpu_probe_kernel.py --images 512 --repeats 3 --configs 16x16x8,16x16x4 \
  --json "$OUT/probe_kernel.json"
step probe_kernel_nojs 60 python3 benchmarks/gpu_probe_kernel.py --images 512 --repeats 3 --configs 16x16x8 --no-js \
  --methods forward,fused --check-images 2 --json "$OUT/probe_kernel_nojs.json"
# four compiled ViT-B/16 loops (timm and SimMIM, bf16 and float8): each compilation takes 30-40 s on the H100
# machine; six did not fit 240 s (2026-11-26)
step pretrain 270 python3 benchmarks/pretrain_throughput.py --device cuda --model vit_base_patch16_224 --model-kwargs "" \
  --batch-size 256 --precision bf16 --compile --fp8 --methods simmim --no-e2e --steps 6 --warmup 2 --repeats 2 \
  --json "$OUT/pretrain.json"

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:
        return None
rows = []
pk = load("probe_kernel.json")
if pk:
    res = {r["method"]: r["img_per_s"] for r in pk["results"]}
    fwd = res.get("forward")
    fused = max((v for k, v in res.items() if k.startswith("fused")), default=None)
    err = max(pk.get("accuracy", {}).get("vs_float64", {}).values(), default=float("nan"))
    if fwd and fused:
        rows.append(("probe stats, fused kernel (vs fwd 0.8x)", fwd, fused, fused / fwd, err))
    if fwd and "torch" in res:
        rows.append(("probe stats, torch path", fwd, res["torch"], res["torch"] / fwd, float("nan")))
nj = load("probe_kernel_nojs.json")
if nj:
    res = {r["method"]: r["img_per_s"] for r in nj["results"]}
    fused = max((v for k, v in res.items() if k.startswith("fused")), default=None)
    err = max(nj.get("accuracy", {}).get("vs_float64", {}).values(), default=float("nan"))
    if res.get("forward") and fused:
        rows.append(("probe stats without JS, fused kernel", res["forward"], fused, fused / res["forward"], err))
pt = load("pretrain.json") or {"results": {}}
targets = {"timm": 4500, "supervised": 4500, "simmim": 4500, "mae": 6000}
base = pt["results"].get("timm", {}).get("img_per_s", float("nan"))
for k, r in pt["results"].items():
    tgt = targets.get(k.split("-")[0], float("nan"))
    rows.append((f"pretrain {k} (target {tgt})", base, r["img_per_s"], r["img_per_s"] / tgt, float("nan")))
print("\n=== summary (anchor = plain forward / plain timm loop; ratio = ours/anchor for the probe, ours/target for pretraining)")
print(f"{'target':44s} {'anchor img/s':>12s} {'ours img/s':>11s} {'ratio':>7s} {'max rel err':>12s}")
for name, a, o, r, e in rows:
    print(f"{name:44s} {a:12.0f} {o:11.0f} {r:7.2f} {e:12.1e}")
PY
