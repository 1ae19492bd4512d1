#!/usr/bin/env bash
# The bundled default: cache the MNIST-1D CNN teacher once, then train the same MLP student from scratch and
# with KD from that cache, and print both test accuracies side by side.
# Caches go to $KD_CACHE_DIR (default .kd-cache/ here), runs to $KD_RUNS_DIR/default (default runs/default).
# Re-running reuses the caches: the teacher runs only the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
export KD_CACHE_DIR="${KD_CACHE_DIR:-.kd-cache}"
data=data/mnist1d
teacher=$data/teacher_cnn.onnx
runs="${KD_RUNS_DIR:-runs}/default"
common=(--student mlp --epochs 60 --batch-size 128 --lr 2e-3 --seed 0 --eval-data "$data/test.parquet" --overwrite --quiet)

# Stage one: the teacher runs once per dataset. T=4 softens the CNN's confident outputs; k=10 is every class.
train_cache=$(pipeline cache-teacher --teacher "$teacher" --data "$data/train.parquet" --top-k 10 --temperature 4 --quiet)
test_cache=$(pipeline cache-teacher --teacher "$teacher" --data "$data/test.parquet" --top-k 10 --temperature 4 --quiet)

# Stage two: the same student, budget and seed; only alpha differs.
pipeline train-student --data "$data/train.parquet" --alpha 0 --out "$runs/scratch" "${common[@]}"
pipeline train-student --data "$data/train.parquet" --cache "$train_cache" --alpha 0.9 --eval-cache "$test_cache" \
    --out "$runs/kd" "${common[@]}"

python - "$runs" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
rows = [(name, json.loads((runs / name / "metrics.json").read_text())) for name in ("scratch", "kd")]
print(f"\n{'student (MLP 100x100)':<24}{'test accuracy':>14}{'train seconds':>15}")
for name, m in rows:
    print(f"{name:<24}{m['test_accuracy']:>14.4f}{m['train_seconds']:>15.1f}")
teacher = json.loads(Path("data/mnist1d/teacher_cnn.json").read_text())
print(f"{'teacher (CNN)':<24}{teacher.get('test_accuracy', float('nan')):>14.4f}")
PY
