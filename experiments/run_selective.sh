#!/usr/bin/env bash
# The runs behind the README's results on innocent subjects and equal parameter budgets (shipped
# model v3, the built-in world with brands and clothing lines; 2-core CPU):
#   variant-*      the mask learner's variants at 30% of the parameters on cast 0 + logos (where
#                  settings are picked): the paper's tensor-count sparsity with a greedy fill, the
#                  parameter-counting sparsity with a greedy fill or a knapsack, 4x the updates, and
#                  the knapsack with logits started from the saliency ranking, with 4 batches per mask
#                  gradient, or with a 4x logit step
#   demo-*         `freezeasguard demo` (equal parameter budget + the paper's tensor budget)
#   frontier-*     `freezeasguard demo --frontier`
# Heavy outputs (fine-tuned models, data) stay under runs/brands/; reports are copied to
# experiments/results/brands-*/. Rerunning resumes finished stages.
#   bash experiments/run_selective.sh [step ...]
set -euo pipefail
cd "$(dirname "$0")/.."
fag=.venv/bin/freezeasguard
runs=runs/brands
mkdir -p $runs
keep() {   # copy a run's report files into experiments/results
  local src=$1 dst=experiments/results/$2
  mkdir -p "$dst"
  cp "$src"/results.md "$src"/results.json "$src"/results.csv "$src"/summary.json "$src"/config.json "$dst"/
  for f in "$src"/tradeoff.png "$src"/frontier.*; do if [ -f "$f" ]; then cp "$f" "$dst"/; fi; done
  if [ -d "$src/tensor-budget" ]; then
    mkdir -p "$dst/tensor-budget"
    cp "$src"/tensor-budget/results.{md,json,csv} "$src"/tensor-budget/summary.json "$dst/tensor-budget/"
  fi
  for d in "$src"/images/*-s0-*; do     # image grids of seed 0 (people, the brand; not the attribute prompts)
    case $(basename "$d") in *-s0-logos|*-s0-clothes) continue ;; esac
    if [ -f "$d/grid.png" ]; then cp "$d/grid.png" "$dst/grid-$(basename "$d").png"; fi
  done
}
variant() {   # variant NAME KEY: VALUE ...: FreezeAsGuard (or $METHODS) alone at 30% of the parameters, cast 0 + logos
  local name=$1; shift
  { echo "preset: demo"; echo "out: $runs/$name"; echo "methods: ${METHODS:-[learned]}"; echo "budget: params"
    echo "innocent: [logos]"; echo "workers: 2"; for kv in "$@"; do echo "$kv"; done; } > $runs/$name.yaml
  $fag experiment $runs/$name.yaml
}
steps=${*:-variant-paper variant-sizes-greedy variant-knapsack variant-knapsack-4x demo-cast0-logos frontier-cast1-clothes demo-cast1-clothes demo-cast2-logos}
for step in $steps; do
  start=$(date +%s)
  case $step in
    variant-paper)        variant $step "sparsity_counts: tensors" "selection: greedy" ;;
    variant-sizes-greedy) variant $step "selection: greedy" ;;
    variant-knapsack)     variant $step ;;
    variant-knapsack-4x)  variant $step "mask_steps: 120" ;;
    variant-knapsack-saliency-start) variant $step "init_from: saliency" "init_logit_low: -3.0" "init_logit_high: -1.0" ;;
    variant-knapsack-upper4) variant $step "upper_batches: 4" ;;
    variant-knapsack-step4x) variant $step "mask_lr: 0.2" ;;
    control-smallest)     METHODS="[smallest]" variant $step ;;
    variant-knapsack-generic-people) variant $step "mask_generic_people: true" ;;
    variant-knapsack-user-lr-1e-2) variant $step "user_lr: 0.01" ;;
    variant-knapsack-user-lr-1e-2-inner20) variant $step "user_lr: 0.01" "inner_steps: 20" ;;
    demo-cast0-logos)     $fag demo --out $runs/$step ;;
    demo-cast1-clothes)   $fag demo --cast-seed 1 --innocent clothes --out $runs/$step ;;
    demo-cast2-logos)     $fag demo --cast-seed 2 --out $runs/$step ;;
    frontier-cast1-clothes) $fag demo --frontier --cast-seed 1 --innocent clothes --out $runs/$step ;;
    frontier-cast2-logos) $fag demo --frontier --cast-seed 2 --out $runs/$step ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  keep $runs/$step brands-$step
  echo "$step: $(( $(date +%s) - start )) s" | tee -a experiments/results/brands-times.txt
done
