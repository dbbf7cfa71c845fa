#!/usr/bin/env bash
# All GPU checks in one call (at most ~8 minutes on one H100: the step limits add up to 490 s), then a short table of targets:
#   probe (ViT-B/16 @ 224, bf16): fused-kernel statistics vs plain fused forward, target >= 0.8x, error <= 1e-3
#   pretraining (ViT-B/16 @ 224, bf16): SimMIM >= 4500 img/s, MAE >= 6000, supervised >= 4500
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

step probe_kernel 150 python3 benchmarks/gpu_probe_kernel.py --images 512 --repeats 3 --configs 16x16x8,16x32x8 \
  --json "$OUT/probe_kernel.json"
step probe_api 100 python3 benchmarks/probe_throughput.py --device cuda --model vit_base_patch16_224 --precision bf16 \
  --batch-size 128 --images 512 --repeats 3 --methods forward,probe --json "$OUT/probe_api.json"
step pretrain 180 python3 benchmarks/pretrain_throughput.py --device cuda --model vit_base_patch16_224 --model-kwargs "" \
  --batch-size 256 --precision bf16 --compile --no-e2e --steps 8 --warmup 3 --repeats 2 --json "$OUT/pretrain.json"
step pretrain_e2e 60 python3 benchmarks/pretrain_throughput.py --device cuda --model vit_base_patch16_224 --model-kwargs "" \
  --batch-size 256 --precision bf16 --no-step --methods simmim --steps 10 --repeats 2 --json "$OUT/pretrain_e2e.json"

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
pa = load("probe_api.json")
if pa:
    res = {r["method"]: r for r in pa["results"]}
    if "forward" in res and "probe" in res:
        f, p = res["forward"]["img_per_s"], res["probe"]["img_per_s"]
        rows.append(("mimlab probe API (+CKA, bootstrap)", f, p, p / f, res["probe"].get("max_rel_err", float("nan"))))
pt = load("pretrain.json") or {"results": {}}
pe = load("pretrain_e2e.json") or {"results": {}}
targets = {"simmim": 4500, "mae": 6000, "supervised": 4500}
if pt["results"]:
    r = {**pe["results"], **pt["results"]}
    for m, tgt in targets.items():
        for kind in ("step", "e2e"):
            k = f"{m}-{kind}"
            if k in r:
                rows.append((f"pretrain {k} (target {tgt})", r.get("timm", {}).get("img_per_s", float("nan")), r[k]["img_per_s"],
                             r[k]["img_per_s"] / tgt, float("nan")))
print("\n=== summary (anchor = plain forward / plain timm loop; ratio = ours/anchor for the probe, ours/target for pretraining)")
print(f"{'target':44s} {'anchor img/s':>12s} {'ours img/s':>11s} {'ratio':>7s} {'max rel err':>12s}")
for name, a, o, r, e in rows:
    print(f"{name:44s} {a:12.0f} {o:11.0f} {r:7.2f} {e:12.1e}")
PY
