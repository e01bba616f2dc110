#!/usr/bin/env bash
# The runs behind "a guard that holds" (docs/guard.md): the identity objective and the immunised
# release against the paper's objective, Saliency, Random, IMMA and Full FT at 30% of the parameters
# (shipped model v3, the built-in world; 2-core CPU):
#   tune-*     settings picked on cast 0 + logos only, one seed, default recipe and lr-x10
#   judge-*    casts nobody tuned on (1 with clothes, 2 with logos), seeds 0-2, the demo's four recipes
# Heavy outputs stay under runs/guard/; reports are copied to experiments/results/guard-*/.
# Rerunning resumes finished stages. WORKERS=1 runs in one process (give it OMP_NUM_THREADS=1 beside other work).
#   bash experiments/run_guard.sh [step ...]
set -euo pipefail
cd "$(dirname "$0")/.."
fag=.venv/bin/freezeasguard
runs=runs/guard
mkdir -p $runs experiments/results
keep() {   # copy a run's report files into experiments/results
  local src=$1 dst=experiments/results/$2
  mkdir -p "$dst"
  for f in results.md results_by_recipe.md results.json results.csv summary.json config.json attack_sweep.md \
           attack_sweep.json attack_sweep.csv attack_sweep.png tradeoff.png; do
    if [ -f "$src/$f" ]; then cp "$src/$f" "$dst/"; fi
  done
  for h in "$src"/protect/*/immunise-*-history.json; do
    if [ -f "$h" ]; then cp "$h" "$dst/$(basename "$(dirname "$h")")-$(basename "$h")"; fi
  done
}
experiment() {   # experiment NAME KEY: VALUE ...: a run at 30% of the parameters
  local name=$1; shift
  { echo "preset: demo"; echo "out: $runs/$name"; echo "budget: params"; echo "workers: ${WORKERS:-2}"
    for kv in "$@"; do echo "$kv"; done; } > $runs/$name.yaml
  $fag experiment $runs/$name.yaml
}
TUNE=("cast_seed: 0" "innocent: [logos]" "seeds: [0]" "attacks: [default, lr-x10]")
ALL="[full, learned, learned-identity, learned-identity+immunise, saliency, saliency+immunise, random, imma]"
steps=${*:-tune-objectives}
for step in $steps; do
  start=$(date +%s)
  case $step in
    tune-objectives) experiment $step "${TUNE[@]}" \
                       "methods: [full, learned, learned-identity, learned-identity+immunise, saliency, saliency-identity]" ;;
    tune-dreambooth) # does a forger who keeps DreamBooth's prior loss bind the name? (experiments/name_binding.py)
                     experiment $step "cast_seed: 0" "innocent: [logos]" "seeds: [0]" "attacks: [dreambooth]" \
                       "methods: [full, learned, learned-identity]" ;;
    tune-immunise-*) # tune-immunise-KEY=VALUE,KEY=VALUE: the immunised release of $MASK's mask (default
                     # saliency) with other settings
                     kvs=$(echo "${step#tune-immunise-}" | tr ',' '\n' | sed 's/=/: /')
                     mapfile -t extra <<< "$kvs"
                     experiment $step "${TUNE[@]}" "methods: [${MASK:-saliency}+immunise]" "${extra[@]}" ;;
    judge-cast1-clothes) experiment $step "cast_seed: 1" "innocent: [clothes]" "methods: $ALL" \
                       "attacks: [default, lr-x10, steps-x5, lora-32]" ;;
    judge-cast2-logos) experiment $step "cast_seed: 2" "innocent: [logos]" "methods: $ALL" \
                       "attacks: [default, lr-x10, steps-x5, lora-32]" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  keep $runs/$step guard-$step
  echo "$step: $(( $(date +%s) - start )) s" | tee -a experiments/results/guard-times.txt
done
