#!/usr/bin/env bash
# `mimlab reproduce` on the GPU machine with benchmarks/gpu_study_short.toml (or the config given as $1), then
# copies the report, summary and tables (not the checkpoints) to $OUT. Wall time and exit status at the end.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_study}
CONFIG=${1:-benchmarks/gpu_study_short.toml}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then   # pinned wheels carried to the device (timm, pycocotools)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name --format=csv,noheader; date -u +%FT%TZ
t0=$SECONDS
timeout "${STUDY_LIMIT:-400}" python3 -m mimlab reproduce --config "$CONFIG" --out /tmp/study --quiet 2>&1 | tee "$OUT/study.log"
rc=${PIPESTATUS[0]}
echo "--- reproduce: exit $rc, $((SECONDS - t0)) s"
(cd /tmp/study 2>/dev/null && find . -type f ! -name '*.pt' ! -name '*.safetensors' ! -name '*.npy' -size -4M \
  -exec cp --parents {} "$OUT/" \;)
python3 - <<'PY'
import json, pathlib
times = sorted((json.loads(p.read_text()).get("seconds", 0.0), str(p.parent.relative_to("/tmp/study/stages")))
               for p in pathlib.Path("/tmp/study/stages").glob("**/stage.json"))
print("stage seconds:", ", ".join(f"{n} {t:.0f}" for t, n in sorted(times, key=lambda x: x[1])))
try:
    s = json.load(open("/tmp/study/summary.json"))
except Exception as e:
    print("no summary.json:", e)
else:
    for k, c in s.get("claims", {}).items():
        print(k, c.get("verdict"), {kk: c[kk] for kk in ("statistic", "value", "threshold") if kk in c})
PY
