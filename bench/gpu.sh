#!/usr/bin/env bash
# Issue 14's GPU acceptance run, prepared as one script: at most 9.5 minutes on one H100/H200 (every section
# has a time limit, all of them inside a 560 s budget) and one log. Sections:
#   1 training step   paper model, fp32 eager / bf16 / bf16+channels_last / bf16+channels_last+compile at
#                     batch 64 and 32, patch 160: s/step, samples/s, ratio to fp32, counted FLOPs, MFU, peak
#                     memory; the largest batch that fits                              (bench/train_step.py)
#   2 training run    paper config under the deepspeed launcher, 1 GPU, bf16, ZeRO-1, 150 steps on shards of
#                     the demo photos; SIGKILL at a random step, restart, loss trajectory vs an uninterrupted
#                     run; data-wait fraction                                          (bench/gpu_train_run.py)
#   3 sampling        benchmark sweep of that run's checkpoints, paper sampler and fastest, images/s
#                                                                                      (bench/sample_sweep.py)
#   4 loader          the training loader with 4 and 8 workers against the GPU's samples/s (bench/loader.py)
#   5 SAM masks       make_shards --sam-checkpoint, random ViT-H, 4 photos at 2K: images/s, memory, workers
#                     per GPU, GPU-hours for DF2K                                      (bench/sam_masks.py)
#   6 precision matrix issue 19: fp32 (TF32 off) / bf16 / fp16 x ZeRO 0/1/2 x grad_accum 1/3, 3 engine steps
#                     each against the plain PyTorch reference on the device; refused cells with their reason;
#                     a table and PASS / FAIL per cell (runs after 2)                  (bench/gpu_matrix.py)
#   summary           the issue's goals, PASS / FAIL / missing                         (bench/gpu_summary.py)
#
#   bash bench/gpu.sh [LOG]                      on the GPU; LOG defaults to bench/gpu-<date>.log
#   DEVICE=cpu SMOKE=1 bash bench/gpu.sh [LOG]   every section end to end at tiny sizes on CPU (CI runs this)
# WORK=DIR keeps the work files there (shards, runs, checkpoints, one JSON per section; default: a new
# temporary folder); BUDGET_S overrides the time budget. Exit status: 0 when every section finished.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-bench/gpu-$(date +%Y%m%d-%H%M).log}
device=${DEVICE:-cuda}
smoke=${SMOKE:-0}
work=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/samdiffsr-gpu.XXXXXX")}
mkdir -p "$work" "$(dirname "$log")"

if [ "$smoke" = 1 ]; then
  # The same code paths at toy sizes: a 2-level UNet with 20 diffusion steps, batch 4, patch 32; the ViT-tiny
  # SAM (SAM's own modules, 32 wide); torch.compile through dynamo + AOT autograd without code generation.
  tiny=(model.hidden_size=16 model.dim_mults=1,2 model.rrdb_num_block=2 model.rrdb_num_feat=16 model.rrdb_growth=8
        model.timesteps=20)
  step_args=(--batch 4,2 --patch 32 --steps 1 --warmup 1 --compile-backend aot_eager --max-batch-cap 8 "${tiny[@]}")
  data_small=(train.batch_size=4 data.patch_size=32 data.shuffle_buffer=8)
  run_args=(--steps 12 --ckpt-every 4 --log-every 2 --photos 2 "${tiny[@]}" "${data_small[@]}" data.workers=2)
  sweep_args=(--images 4 --crop 64 --batch 4 --precision fp32)
  loader_args=(--batches 4 --warmup 1 "${data_small[@]}")
  sam_args=(--model-type vit_tiny --long-side 256 --images 2 --amg points_per_side=4)
  matrix_args=(--accums 1)
  budget=${BUDGET_S:-2400}
  stretch=6  # section limits x6: a shared 2-core CPU is slow even at these sizes; the budget still caps them
else
  step_args=(--batch 64,32 --patch 160 --steps 10 --warmup 3 --max-batch-cap 4096)
  run_args=(--steps 150 --ckpt-every 25 --log-every 5)
  sweep_args=(--images 32 --crop 256 --batch 32 --precision bf16)
  loader_args=(--batches 30 --warmup 3)
  sam_args=(--model-type vit_h --long-side 2040)
  matrix_args=()
  budget=${BUDGET_S:-560}
  stretch=1
fi

main() {
  local start_all failed=()
  start_all=$(date +%s)
  section() {  # section TITLE SECONDS CMD...: CMD under the smaller of SECONDS and what is left of the budget
    local title=$1 want=$2 left limit t0 rc
    shift 2
    want=$(( want * stretch ))
    left=$(( budget - ($(date +%s) - start_all) ))
    limit=$(( want < left ? want : left ))
    echo; echo "## $title"
    if [ "$limit" -lt 10 ]; then
      echo "[$title: skipped, the ${budget} s budget is spent]"; failed+=("$title"); return
    fi
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@"
    rc=$?
    echo "[$title: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)$([ $rc -eq 124 ] && echo ', TIMED OUT')]"
    [ $rc -eq 0 ] || failed+=("$title")
  }
  echo "# bench/gpu.sh $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname); DEVICE=$device SMOKE=$smoke; work $work"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '| cpus', __import__('os').cpu_count())" 2>&1 | grep -v "real_accelerator"

  section "1 training step" 170 python bench/train_step.py --device "$device" --variants gpu --json "$work" "${step_args[@]}"
  section "2 training run" 170 python bench/gpu_train_run.py --work "$work" --device "$device" "${run_args[@]}"
  # The matrix runs third (its own tiny model and data), so that a spent budget cuts a benchmark, not it.
  section "6 precision matrix" 90 python bench/gpu_matrix.py --work "$work" --device "$device" "${matrix_args[@]}"
  section "3 sampling" 60 python bench/sample_sweep.py --run "$work/runs/A" --work "$work" --device "$device" "${sweep_args[@]}"
  section "4 loader" 45 python bench/loader.py --shards "$work/shards/train" --work "$work" --device "$device" --workers 4,8 "${loader_args[@]}"
  section "5 SAM masks" 150 python bench/sam_masks.py --work "$work" --device "$device" "${sam_args[@]}"
  section "summary" 30 python bench/gpu_summary.py "$work"
  echo
  echo "## end: $(( $(date +%s) - start_all )) s in all; sections that did not finish: ${failed[*]:-none}"
  [ ${#failed[@]} -eq 0 ]
}

main 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "log: $log"
exit "$status"
