#!/usr/bin/env bash
# The GPU checks of configs/vitb16_t5base.yaml (the paper's model) in one call on a lent machine
# with no package index, ordered by what matters most if time runs out; every result lands in $OUT.
#   1. bench/throughput.py: one worker's DeepSpeed step, eager, at the config's 128 pairs per GPU
#   2. the same model through Ray Train + DeepSpeed on generated 224 px data (img/s, data wait)
#   3. bench/throughput.py with --compile, then eager at 256 pairs
#   4. bench/loss_memory.py: the fused loss against the local-loss reference on the GPU
#   5. bench/profile_step.py: where the eager (profile) and the compiled step (profile-compiled) spend
#      their time
#   6. (named only) host-bound step, next: compiled at 256 pairs (compile256); Ray Train with
#      train.compile=true at 128 and 256 pairs per GPU (train-compiled); DeepSpeed's BF16_Optimizer
#      as shipped against engine.GroupedGradients at 128 pairs (host-ops); model.layers' patch matmul
#      against torch's convolution at 128 pairs (layers: on a GPU only the patch embedding differs)
# Run all: `bash bench/gpu.sh`; some: `bash bench/gpu.sh profile loss`. A lent machine sends back at
# most 8 files: the default checks write 7 JSON files (compile256 one more: name fewer checks per
# call), and each check's whole output goes to $OUT/log.txt.
# The packages the machine lacks travel in .whl/, which `bash bench/gpu_wheels.sh` fills here first
# (wheels, deepspeed's sdist, a repacked ray: under the 64 MiB limit on what travels); .whl/ is
# git-ignored, so the call must carry it (the device tool's `carry: [".whl"]`).
set -u
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
say() { echo "== $(date +%T) $*"; }
# run NAME LINES CMD...: CMD's output to /tmp/NAME.log, appended to $OUT/log.txt; its last LINES printed
run() {
  local name=$1 lines=$2
  shift 2
  "$@" >"/tmp/$name.log" 2>&1
  echo "rc=$?" >>"/tmp/$name.log"
  { echo "== $name: $*"; cat "/tmp/$name.log"; } >>"$OUT/log.txt"
  grep -v -i "warn" "/tmp/$name.log" | tail -n "$lines"
}
last() { grep -v -i "warn" "$1" | tail -n "$2"; }

say install
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
python3 -c "import tarfile; tarfile.open('.whl/ray-stripped.tar.xz').extractall('/tmp/site', filter='fully_trusted')"
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
  --target /tmp/site .whl/deepspeed-*.tar.gz >/tmp/install.log 2>&1 || last /tmp/install.log 20
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, timm, transformers, deepspeed, ray; print('torch', torch.__version__, 'timm', \
timm.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__)"

B=(python3 bench/throughput.py --config configs/vitb16_t5base.yaml --steps 10 --reps 3)
P=(python3 bench/profile_step.py --config configs/vitb16_t5base.yaml --batch 128 --steps 3 --top 12)
T=(data.train=/tmp/gpudata/train data.val=/tmp/gpudata/val train.run_name=gpu train.storage=/tmp/gpuruns
  train.num_workers=1 train.cpus_per_worker=2 train.global_batch_size=128 train.steps=60 train.warmup_steps=10
  train.log_every=10 train.val_every=1000 train.val_batches=2 train.checkpoint_every=1000 train.wandb.mode=disabled)
checks=("$@")
[ ${#checks[@]} -eq 0 ] && checks=(throughput train compile loss profile profile-compiled)
for check in "${checks[@]}"; do
  case $check in
  throughput)
    say "throughput, eager, batch 128"
    run tp128 8 timeout 150 "${B[@]}" --batch 128 --json "$OUT/tp128.json"
    ;;
  train)
    say "Ray Train + DeepSpeed, 1 GPU worker, 224 px data"
    run data 1 timeout 90 python3 -m clippy_ray.cli data make-benchmark --out /tmp/gpudata --rows 6400 \
      --eval-rows 256 --rows-per-shard 512 --image-size 224 --format jpeg
    run train 14 timeout 200 python3 -m clippy_ray.cli train --config configs/vitb16_t5base.yaml "${T[@]}"
    ;;
  compile)
    say "throughput, compiled, batch 128; eager, batch 256"
    run tp128c 6 timeout 170 "${B[@]}" --batch 128 --compile --warmup 4 --json "$OUT/tp128c.json"
    run tp256 6 timeout 80 "${B[@]}" --batch 256 --json "$OUT/tp256.json"
    ;;
  loss)
    say "fused loss vs local loss: automatic block, 4096 and 2048 columns"
    run loss 5 timeout 45 python3 bench/loss_memory.py --reps 5 --json "$OUT/loss.json"
    run loss4096 4 timeout 45 python3 bench/loss_memory.py --reps 5 --block 4096 --json "$OUT/loss4096.json"
    run loss2048 4 timeout 45 python3 bench/loss_memory.py --reps 5 --block 2048 --json "$OUT/loss2048.json"
    ;;
  profile)
    say "profile, eager, batch 128"
    run prof128 16 timeout 90 "${P[@]}" --json "$OUT/prof128.json"
    ;;
  profile-compiled)
    say "profile, compiled, batch 128"
    run prof128c 16 timeout 150 "${P[@]}" --compile --warmup 4  # in log.txt only: 8 files come back
    ;;
  compile256)
    say "throughput, compiled, batch 256"
    run tp256c 6 timeout 170 "${B[@]}" --batch 256 --compile --warmup 4 --json "$OUT/tp256c.json"
    ;;
  train-compiled)
    say "Ray Train + DeepSpeed, train.compile=true, 128 then 256 pairs per GPU"
    [ -d /tmp/gpudata ] || run data 1 timeout 90 python3 -m clippy_ray.cli data make-benchmark --out /tmp/gpudata \
      --rows 12800 --eval-rows 256 --rows-per-shard 512 --image-size 224 --format jpeg
    for b in 128 256; do
      run "train${b}c" 14 timeout 240 python3 -m clippy_ray.cli train --config configs/vitb16_t5base.yaml "${T[@]}" \
        train.compile=true train.global_batch_size=$b train.run_name=gpu-c$b
    done
    ;;
  host-ops)
    say "operators per step and step time: BF16_Optimizer as shipped against GroupedGradients, batch 128"
    run hostops 6 timeout 200 python3 bench/host_ops.py --config configs/vitb16_t5base.yaml --batch 128 --reps 6 \
      --json "$OUT/hostops.json"
    ;;
  layers)
    say "model.layers against torch's layers, each layer and the step, batch 128"
    run layers 8 timeout 200 python3 bench/layers.py --config configs/vitb16_t5base.yaml --batch 128 --steps 10 \
      --reps 4 --json "$OUT/layers.json"
    ;;
  *)
    echo "unknown check $check (throughput, train, compile, loss, profile, profile-compiled, compile256, train-compiled,"
    echo "  host-ops, layers)"
    exit 2
    ;;
  esac
done
say done
