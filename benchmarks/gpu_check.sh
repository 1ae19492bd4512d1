#!/usr/bin/env bash
# One short check of stage one on a CUDA machine (prepared on a CPU machine; run it where a GPU is lent):
#   1. the CUDA execution provider really ran (the cache manifest's `providers`, not just the request);
#   2. the GPU cache equals a CPU cache of the same request: ids equal, log-probs within 1e-3;
#   3. the pipeline's throughput against bare ONNX Runtime on the GPU, on the same batches (medians of rounds).
# Usage, from the repository root:  bash benchmarks/gpu_check.sh [POSITIONS] [ROUNDS]
#
# The device image has plain onnxruntime (CPU only) and no duckdb. Wheels carried in .whl/ (onnxruntime-gpu,
# duckdb, built for its Python 3.12; see /work/.library/device/README.md) are installed into /tmp/site first,
# which then shadows the image's onnxruntime. Without them the check stops at step 1 and says why.
set -euo pipefail
positions=${1:-6000}
rounds=${2:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing the carried wheels from .whl/ into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "no .whl/ here: using the image's own onnxruntime (plain onnxruntime has no CUDA provider)"
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

python3 - "$work" "$positions" "$rounds" <<'EOF'
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa

from benchmarks.cache_throughput import build_dataset, build_synthetic_teacher, pipeline_batches, time_bare
from stages import cache_teacher
from stages.cache_format import open_cache
from stages.config import CacheTeacherConfig
from stages.errors import TeacherError
from stages.teacher import Teacher

work, positions, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(f"onnxruntime {ort.__version__} from {ort.__file__}; providers {ort.get_available_providers()}")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("FAIL: no CUDAExecutionProvider; carry onnxruntime-gpu (and its CUDA/cuDNN wheels) in .whl/")

teacher, data = work / "synthetic_lm.onnx", work / "tokens.parquet"
build_synthetic_teacher(teacher, 50_257, 576, 4)
build_dataset(data, positions, 32, 128, 50_257, None)


def config(device: str, cache_dir: Path) -> CacheTeacherConfig:
    return CacheTeacherConfig(teacher=str(teacher), data=str(data), top_k=32, device=device, cache_dir=str(cache_dir))


def table(path: Path) -> pa.Table:
    return pa.concat_tables(open_cache(path).iter_tables(["id", "position", "topk_ids", "topk_logp"]))


# 1 and 2: a GPU cache and a CPU cache of the same request (same key), compared position by position.
try:
    gpu = cache_teacher.run(config("cuda", work / "gpu"), progress=False, log=lambda m: None)
except TeacherError as exc:
    sys.exit(f"FAIL: {exc}")
cpu = cache_teacher.run(config("cpu", work / "cpu"), progress=False, log=lambda m: None)
providers = gpu.manifest["providers"]
print(f"GPU cache {gpu.path.name}: providers {providers}, top-k in {gpu.manifest.get('postprocess')}")
if providers != ["CUDAExecutionProvider"]:
    sys.exit(f"FAIL: the GPU run's manifest says it ran on {providers}, not CUDAExecutionProvider")
g, c = table(gpu.path), table(cpu.path)
ids_g, ids_c = (np.array(t.column("topk_ids").to_pylist()) for t in (g, c))
logp_g, logp_c = (np.array(t.column("topk_logp").to_pylist()) for t in (g, c))
# Near-ties can swap order between devices: compare each id's log-prob where the sets agree, count the rest.
same_ids = (ids_g == ids_c).all(1)
dlogp = np.abs(logp_g - logp_c).max()
print(f"cache equality: {same_ids.mean():.4%} of {len(same_ids)} positions have equal ids; max |dlogp| {dlogp:.2e}")
ok = bool(same_ids.all() and dlogp <= 1e-3)

# 3: bare ORT (CUDA session, full logits to the host) against the pipeline end to end, interleaved rounds. Each
# round's bare session is fresh and timed from its first call, as the pipeline's shard loop is (CUDA's first call
# loads kernels and sizes the arena: the warm-up both pay, printed).
bare_teacher = Teacher(teacher, device="cuda")
batches = pipeline_batches(bare_teacher, config("cuda", work / "b"))
del bare_teacher
bare, pipe, steady, warm_up = [], [], [], []
for r in range(rounds):
    bare_teacher = Teacher(teacher, device="cuda")
    timed = time_bare(bare_teacher, batches)
    again = time.perf_counter()
    bare_teacher.session.run([bare_teacher.info.logits_output], batches[0][0])
    warm_up.append(timed["first_call_seconds"] - (time.perf_counter() - again))
    del bare_teacher
    bare.append(timed["positions_per_second"])
    t = time.perf_counter()
    run = cache_teacher.run(config("cuda", work / f"r{r}"), progress=False, log=lambda m: None)
    n = run.manifest["num_positions"]
    pipe.append(n / (time.perf_counter() - t))
    steady.append(n / run.manifest["run"]["seconds"])
b = statistics.median(bare)
result = {
    "positions": int(len(same_ids)),
    "ids_equal_fraction": float(same_ids.mean()),
    "max_abs_dlogp": float(dlogp),
    "bare_positions_per_second": b,
    "ratio_end_to_end": statistics.median(pipe) / b,
    "ratio_steady": statistics.median(steady) / b,
    "bare_warm_up_seconds": statistics.median(warm_up),
    "providers": providers,
}
print(json.dumps(result, indent=2))
sys.exit(0 if ok else "FAIL: the GPU cache differs from the CPU cache (see above)")
EOF
