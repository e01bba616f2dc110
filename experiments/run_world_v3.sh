#!/usr/bin/env bash
# The runs behind the README's results on world v3 (2-core CPU, about 45 minutes in all): the demo
# on cast 0 + logos (the README's first command), on two casts nobody tuned on with the other
# innocent domain and with logos, the comparison at an equal parameter budget, and the learned
# mask's seed agreement and role swap, and the attack sweep (every method under 11 attack recipes,
# about 50 minutes more; its report goes to experiments/results/attack-sweep/). Heavy outputs (fine-tuned models, data) stay under runs/;
# the reports are copied to experiments/results/w3-*/. Rerunning resumes finished stages.
#   bash experiments/run_world_v3.sh [demo-cast0-logos demo-cast1-clothes demo-cast2-logos params-cast0-logos agreement attack-sweep]
set -euo pipefail
cd "$(dirname "$0")/.."
fag=.venv/bin/freezeasguard
runs=runs/w3
keep() {   # copy a run's report files into experiments/results
  local src=$1 dst=experiments/results/$2
  mkdir -p "$dst"
  cp "$src"/results.md "$src"/results.json "$src"/results.csv "$src"/summary.json "$src"/config.json "$dst"/
  if [ -f "$src"/tradeoff.png ]; then cp "$src"/tradeoff.png "$dst"/; fi
  for f in "$src"/attack_sweep*; do if [ -f "$f" ]; then cp "$f" "$dst"/; fi; done
  # image grids of seed 0 under the default recipe (attack runs end in the attack's name)
  for d in "$src"/images/*-s0-*; do
    rest=$(basename "$d"); rest=${rest#*-s0-}
    if [[ $rest == *-* ]]; then continue; fi     # a subject or domain has no dash; an attack's suffix adds one
    if [ -f "$d/grid.png" ]; then cp "$d/grid.png" "$dst/grid-$(basename "$d").png"; fi
  done
}
steps=${*:-demo-cast0-logos demo-cast1-clothes demo-cast2-logos params-cast0-logos agreement attack-sweep}
for step in $steps; do
  start=$(date +%s)
  case $step in
    demo-cast0-logos)   $fag demo --out $runs/$step ;;
    demo-cast1-clothes) $fag demo --cast-seed 1 --innocent clothes --out $runs/$step ;;
    demo-cast2-logos)   $fag demo --cast-seed 2 --out $runs/$step ;;
    params-cast0-logos) $fag demo --budget params --out $runs/$step ;;
    agreement)          OMP_NUM_THREADS=2 .venv/bin/python experiments/mask_agreement.py --world 1:clothes 0:logos \
                          --work $runs/agreement --out experiments/results/w3-agreement/agreement.json ;;
    attack-sweep)       $fag attack-sweep --out $runs/$step ;;
  esac
  case $step in
    agreement) ;;
    attack-sweep) keep $runs/$step attack-sweep ;;
    *) keep $runs/$step w3-$step ;;
  esac
  echo "$step: $(( $(date +%s) - start )) s" | tee -a experiments/results/w3-times.txt
done
