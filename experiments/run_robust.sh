#!/usr/bin/env bash
# The runs behind the README's results on protection against the attacker's choice of recipe
# (shipped model v3, the built-in world; 2-core CPU, 2 workers of one thread):
#   tune-*     mask learners at 30% of the parameters on cast 0 + logos (where settings are picked),
#              each under the short sweep (default, lr-x10, steps-x5, lora-32)
#   ceiling    does any mask hold against the strongest recipes at a larger share (50%, 80% of the
#              parameters), and what does the brand keep there
#   demo-cast0-logos  `freezeasguard demo` (its table: the default recipe with the short sweep's worst case)
#   sweep-*    `freezeasguard attack-sweep` (all 11 recipes) on casts not tuned on: Full FT, Random,
#              Saliency, the paper's single-user learner and the learner over a range of users
# Heavy outputs stay under runs/robust/; reports are copied to experiments/results/robust-*/.
# Rerunning resumes finished stages.
#   bash experiments/run_robust.sh [step ...]
set -euo pipefail
cd "$(dirname "$0")/.."
fag=.venv/bin/freezeasguard
runs=runs/robust
mkdir -p $runs
SHORT="[default, lr-x10, steps-x5, lora-32]"
keep() {   # copy a run's report files into experiments/results
  local src=$1 dst=experiments/results/$2
  mkdir -p "$dst"
  for f in results.md results_by_recipe.md results.json results.csv summary.json config.json attack_sweep.md attack_sweep.json \
           attack_sweep.csv attack_sweep.png attack_sweep_summary.md; do
    if [ -f "$src/$f" ]; then cp "$src/$f" "$dst/"; fi
  done
  if [ -d "$src/tensor-budget" ]; then
    mkdir -p "$dst/tensor-budget"
    cp "$src"/tensor-budget/results.{md,json,csv} "$src"/tensor-budget/summary.json "$dst/tensor-budget/"
  fi
}
experiment() {   # experiment NAME KEY: VALUE ...: a run at 30% of the parameters
  local name=$1; shift
  { echo "preset: attack-sweep"; echo "out: $runs/$name"; echo "budget: params"; echo "workers: 2"
    for kv in "$@"; do echo "$kv"; done; } > $runs/$name.yaml
  $fag experiment $runs/$name.yaml
}
# the learner over a range of simulated users (the settings picked on cast 0; README)
ROBUST=("simulated_users: sgd,adam" "user_lr_min_factor: 0.3" "user_lr_max_factor: 30" "user_trajectory: restart")
steps=${*:-tune-baselines tune-paper tune-adam-range}
for step in $steps; do
  start=$(date +%s)
  case $step in
    tune-baselines)  experiment $step "methods: [full, random, saliency]" "innocent: [logos]" "attacks: $SHORT" ;;
    tune-paper)      experiment $step "methods: [learned]" "innocent: [logos]" "attacks: $SHORT" ;;
    tune-adam-range) experiment $step "methods: [learned]" "innocent: [logos]" "attacks: $SHORT" "${ROBUST[@]}" ;;
    tune-adam-range-k2) experiment $step "methods: [learned]" "innocent: [logos]" "attacks: $SHORT" "${ROBUST[@]}" \
                       "users_per_update: 2" "user_weighting: softmax" ;;
    tune-warm-x10)   experiment $step "methods: [learned]" "innocent: [logos]" "attacks: $SHORT" "warm_start_lr: 0.001" ;;
    tune-warm-x10-adam-range) experiment $step "methods: [learned]" "innocent: [logos]" "attacks: $SHORT" \
                       "warm_start_lr: 0.001" "${ROBUST[@]}" ;;
    tune-adam-continue) experiment $step "methods: [learned]" "innocent: [logos]" "attacks: $SHORT" \
                       "simulated_users: adam" "user_lr_min_factor: 1" "user_lr_max_factor: 10" ;;
    tune-adam-x3-continue) experiment $step "methods: [learned]" "innocent: [logos]" "attacks: $SHORT" \
                       "simulated_users: adam" "user_lr_min_factor: 3" "user_lr_max_factor: 3" ;;
    ceiling)         experiment $step "methods: [learned, saliency]" "innocent: [logos]" "ratios: [0.5, 0.8]" \
                       "attacks: [default, lr-x3, lr-x10, steps-x5]" \
                       "attack_recipes: {lr-x3: {lr_factor: 3, summary: AdamW at 3x the learning rate}}" ;;
    sweep-cast1-clothes) experiment $step "cast_seed: 1" "innocent: [clothes]" ;;
    sweep-cast2-logos)   experiment $step "cast_seed: 2" "innocent: [logos]" ;;
    sweep-cast1-clothes-robust) experiment $step "cast_seed: 1" "innocent: [clothes]" "methods: [learned]" "${ROBUST[@]}" ;;
    sweep-cast2-logos-robust)   experiment $step "cast_seed: 2" "innocent: [logos]" "methods: [learned]" "${ROBUST[@]}" ;;
    demo-cast0-logos) $fag demo --out $runs/$step ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  keep $runs/$step robust-$step
  echo "$step: $(( $(date +%s) - start )) s" | tee -a experiments/results/robust-times.txt
done
