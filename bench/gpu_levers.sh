#!/usr/bin/env bash
# Issue 20 point 7's lever ablation on one GPU, inside a hard time limit, through the real code paths:
#   1 shards       python launcher/make_shards.py (the demo shards: 11 training photos, 26 held-out crops)
#   2 RRDB         python launcher/train.py --config configs/demo_rrdb.yaml (the frozen LR encoder)
#   3 arms         every arm x seed of the ablation below trained IN PARALLEL (one process each, on the GPU),
#                  each scored as soon as it is trained: exactly the train.py overrides, run dirs, benchmark
#                  arguments and bench dirs launcher/ablate.py would use (samdiffsr/ablation/plan.py; printed
#                  by the plan step below), so that
#   4 ablate       python launcher/ablate.py ... finds every run trained (samdiffsr/train/launch.py skips a run
#                  at train.max_steps) and every (checkpoint, set) scored (ResultStore), and only compares:
#                  ablation.md/.csv/.json and plot_<metric>.png. If the time limit cut some arms, it runs on the
#                  arms whose seeds all finished (base first), so that what finished is compared.
#   5 vs bicubic   bench/levers_vs_bicubic.py: each arm - bicubic per step with intervals, and the first step at
#                  which it beats bicubic in both PSNR-Y and SSIM-Y (levers_vs_bicubic.md)
# Arms (demo recipe configs/demo.yaml, 900 steps, checkpoints every 150 steps all kept; 2 seeds; held-out set
# shards/demo/val; sampler ddim, 10 steps, eta 1; 1 rank, as ablate.py on a 1-GPU machine):
#   base= | ema_warmup=train.ema_warmup_power=0.75 | lr_warmup=optim.warmup_steps=100 | min_snr=train.snr_gamma=5
#   low_noise=train.timestep_sampling=low_noise | low_noise2=... plus train.timestep_power=2
#   combo=low_noise + ema_warmup_power 0.75 + snr_gamma 5 | combo_lr=combo + optim.warmup_steps 100
#
#   bash bench/gpu_levers.sh LIMIT_S OUTDIR            on the GPU (after: source bench/device_setup.sh)
#   SMOKE=1 bash bench/gpu_levers.sh 1500 OUTDIR       the same on CPU at toy sizes (3 arms, 1 seed, one job at
#                                                      a time, DS_ACCELERATOR=cpu)
# OUTDIR gets at most 8 top-level files (what a device call returns): levers.log (this script's output),
# ablation.md/.csv/.json, plot_psnr_y.png, plot_ssim_y.png, levers_vs_bicubic.md, and levers_results.tar.gz (every
# small text result: each run's results_per_image.csv, summaries, configs, logs; no checkpoints). The work
# (shards, runs, weights) lives in WORK (default: a new temporary folder). Env: ARMS="base min_snr ..." a
# subset (base first), SEEDS, JOBS (parallel processes; default 16, SMOKE 1), THREADS (OMP threads per process).
# Exit status: 0 when the full ablation (every arm, every seed) was compared.
set -uo pipefail
limit=${1:?usage: bash bench/gpu_levers.sh LIMIT_S OUTDIR}
dest=${2:?usage: bash bench/gpu_levers.sh LIMIT_S OUTDIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
start=$(date +%s)
smoke=${SMOKE:-0}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
work=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/samdiffsr-levers.XXXXXX")}
mkdir -p "$work"
work=$(cd "$work" && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python}

declare -A arm_spec=(
  [base]=""
  [ema_warmup]="train.ema_warmup_power=0.75"
  [lr_warmup]="optim.warmup_steps=100"
  [min_snr]="train.snr_gamma=5"
  [low_noise]="train.timestep_sampling=low_noise"
  [low_noise2]="train.timestep_sampling=low_noise,train.timestep_power=2"
  [combo]="train.timestep_sampling=low_noise,train.ema_warmup_power=0.75,train.snr_gamma=5"
  [combo_lr]="train.timestep_sampling=low_noise,train.ema_warmup_power=0.75,train.snr_gamma=5,optim.warmup_steps=100"
)
if [ "$smoke" = 1 ]; then
  # bench/gpu.sh's toy model; a few steps; the RRDB shares the model.* keys the diffusion run loads it with.
  tiny=(model.hidden_size=16 model.dim_mults=1,2 model.rrdb_num_block=2 model.rrdb_num_feat=16 model.rrdb_growth=8
        model.timesteps=20 train.batch_size=4 data.patch_size=32 data.shuffle_buffer=8 data.workers=0)
  rrdb_extra=("${tiny[@]}" train.max_steps=4 train.ckpt_every=4 train.val_every=4 train.log_every=2)
  arm_extra=("${tiny[@]}" train.max_steps=6 train.ckpt_every=3 train.keep_every=3 train.val_every=6 train.log_every=2)
  arms=(${ARMS:-base low_noise2 combo_lr})
  seeds=${SEEDS:-1}
  jobs=${JOBS:-1}
  threads=${THREADS:-1}
  export DS_ACCELERATOR=cpu
  reserve=120  # the ablate step and the collection on a slow shared CPU
else
  rrdb_extra=()
  arm_extra=(train.ckpt_every=150 train.keep_every=150)
  arms=(${ARMS:-base ema_warmup lr_warmup min_snr low_noise low_noise2 combo combo_lr})
  seeds=${SEEDS:-2}
  jobs=${JOBS:-16}
  threads=${THREADS:-1}
  reserve=45
fi
abl_out=abl  # relative to $work, as every path of the ablation
rrdb_ckpt=runs/demo_rrdb/weights/latest.pt

ablate_args() {  # ablate_args ARM...: the launcher/ablate.py arguments for these arms
  local a out=()
  for a in "$@"; do out+=(--arm "$a=${arm_spec[$a]}"); done
  printf '%s\n' --config "$repo/configs/demo.yaml" "${out[@]}" --seeds "$seeds" --ranks 1 --sets demo=shards/demo/val \
    --sampler ddim --steps 10 --eta 1 --out "$abl_out" "train.rrdb_ckpt=$rrdb_ckpt" "${arm_extra[@]}"
}

left() { echo $(( limit - ($(date +%s) - start) )); }
stage() {  # stage TITLE SECONDS CMD...: CMD under the smaller of SECONDS and the time left
  local title=$1 want=$2 l rc t0
  shift 2
  l=$(left); l=$(( want < l ? want : l ))
  echo; echo "## $title ($(( $(date +%s) - start )) s in)"
  if [ "$l" -lt 5 ]; then echo "[$title: skipped, no time left]"; return 124; fi
  t0=$(date +%s)
  timeout -k 10 "$l" "$@"
  rc=$?
  echo "[$title: exit $rc after $(( $(date +%s) - t0 )) s (limit $l s)$([ $rc -eq 124 ] && echo ', TIMED OUT')]"
  return $rc
}

collect() {
  echo; echo "## collect ($(( $(date +%s) - start )) s in)"
  (cd "$work" && timeout 60 "$py" "$repo/bench/levers_vs_bicubic.py" "$abl_out" --md "$dest/levers_vs_bicubic.md" \
     2>&1 | grep -v real_accelerator | head -80)
  local f
  for f in ablation.md ablation.csv ablation.json plot_psnr_y.png plot_ssim_y.png; do
    [ -f "$work/$abl_out/$f" ] && cp "$work/$abl_out/$f" "$dest/"
  done
  (cd "$work" && find . \( -path ./shards -o -name weights -o -name 'step*' -o -name images \) -prune -o -type f \
     \( -name '*.csv' -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' -o -name '*.txt' \
        -o -name '*.yaml' -o -name '*.html' -o -name '*.status' -o -name '*.tsv' -o -name '*.err' \) -size -4M -print | tar -czf "$dest/levers_results.tar.gz" -T -)
  echo "results: $(ls "$dest" | tr '\n' ' ')($(du -sh "$dest" | cut -f1)); work $work"
}

main() {
  cd "$work" || return 1
  echo "# bench/gpu_levers.sh $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname); limit ${limit} s; SMOKE=$smoke; arms ${arms[*]};" \
       "seeds $seeds; jobs $jobs; threads $threads; work $work"
  echo "commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads

  stage "1 shards" 300 "$py" "$repo/launcher/make_shards.py" 2>&1 | tail -5
  OMP_NUM_THREADS=$(( smoke == 1 ? 1 : 4 )) stage "2 RRDB" 300 "$py" "$repo/launcher/train.py" \
    --config "$repo/configs/demo_rrdb.yaml" train.run_dir=runs/demo_rrdb "${rrdb_extra[@]}" 2>&1 | grep -v real_accelerator | tail -8
  [ -f "$rrdb_ckpt" ] || { echo "no RRDB weights ($rrdb_ckpt): stop"; return 1; }

  # The plan: exactly what ablate.py would run for each arm x seed (train command, bench command).
  mapfile -t args < <(ablate_args "${arms[@]}")
  "$py" - "${args[@]}" > plan.tsv 2> plan.err <<'EOF' || { grep -v real_accelerator plan.err; echo "no plan: stop"; return 1; }
import shlex, sys
from samdiffsr.ablation.cli import build_parser, spec_from_args
spec = spec_from_args(build_parser().parse_intermixed_args(sys.argv[1:]))
spec.check()
for arm in spec.arms:
    for seed in spec.seed_values():
        train = ["launcher/train.py", "--config", spec.config, *spec.train_overrides(arm, seed),
                 f"train.run_dir={spec.run_dir(arm, seed)}"]
        print(f"{arm.name}\t{seed}\t{shlex.join(train)}\t{shlex.join(['launcher/benchmark.py', *spec.bench_args(arm, seed)])}")
EOF
  [ -s plan.tsv ] || { echo "no plan: stop"; return 1; }
  echo; echo "## 3 arms: $(wc -l < plan.tsv) runs, $jobs at a time ($(( $(date +%s) - start )) s in)"
  mkdir -p logs done
  local until_s=$(( limit - reserve )) arm seed train bench
  while IFS=$'\t' read -r arm seed train bench; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
    echo "  start $arm seed $seed: python $train"
    (
      t0=$(date +%s)
      l=$(( until_s - (t0 - start) ))
      [ "$l" -gt 5 ] || { echo "$arm seed $seed: no time left" > "logs/$arm-seed$seed.status"; exit 124; }
      eval "timeout -k 10 $l $py $repo/$train" > "logs/train-$arm-seed$seed.log" 2>&1
      rc=$?; t1=$(date +%s)
      if [ $rc -eq 0 ]; then
        l=$(( until_s - (t1 - start) ))
        eval "timeout -k 10 $l $py $repo/$bench" > "logs/bench-$arm-seed$seed.log" 2>&1
        rb=$?
      else rb=-1; fi
      t2=$(date +%s)
      echo "$arm seed $seed: train exit $rc in $(( t1 - t0 )) s, bench exit $rb in $(( t2 - t1 )) s" | tee "logs/$arm-seed$seed.status"
      [ $rc -eq 0 ] && [ $rb -eq 0 ] && touch "done/$arm-seed$seed"
    ) < /dev/null &
  done < plan.tsv
  wait
  echo "[3 arms: $(ls done | wc -l) of $(wc -l < plan.tsv) runs trained and scored, $(( $(date +%s) - start )) s in]"
  for f in logs/train-"${arms[0]}"-seed*.log; do echo "--- tail of $f"; grep -v real_accelerator "$f" | tail -3; done

  # 4: the comparison, over every arm whose seeds all finished (the first arm must be among them).
  local complete=() s ok
  for arm in "${arms[@]}"; do
    ok=1
    while IFS=$'\t' read -r a s _; do [ "$a" = "$arm" ] && [ ! -f "done/$arm-seed$s" ] && ok=0; done < plan.tsv
    [ $ok = 1 ] && complete+=("$arm")
  done
  local full=1
  [ ${#complete[@]} -eq ${#arms[@]} ] || full=0
  echo "complete arms: ${complete[*]:-none}"
  if [ ${#complete[@]} -ge 2 ] && [ "${complete[0]}" = "${arms[0]}" ]; then
    mapfile -t args < <(ablate_args "${complete[@]}")
    echo "\$ python launcher/ablate.py ${args[*]}"
    stage "4 ablate" $(( $(left) - 15 )) "$py" "$repo/launcher/ablate.py" "${args[@]}" > logs/ablate.log 2>&1
    grep -v real_accelerator logs/ablate.log | grep -E "already trained|^=== |vs .*, step|^\[4 ablate|rror" | tail -60
    [ -f "$abl_out/ablation.md" ] || full=0
  else
    echo "[4 ablate: skipped, fewer than 2 complete arms or not the baseline]"; full=0
  fi
  [ $full = 1 ]
}

main 2>&1 | tee "$dest/levers.log"
status=${PIPESTATUS[0]}
collect 2>&1 | tee -a "$dest/levers.log"
echo "gpu_levers: exit $status, $(( $(date +%s) - start )) s" | tee -a "$dest/levers.log"
exit "$status"
