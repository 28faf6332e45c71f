#!/usr/bin/env bash
# The deep-FL protocol on one CUDA GPU, as measured for the README (H100, 2026-11-26).
#
#   DATA=../shared/data/mnist_t10k OUT=runs/deep_fl_gpu bash benchmarks/deep_fl_gpu.sh
#
# Part A: MNIST, Dirichlet label skew alpha in {0.1, 0.5}, 3 seeds, 100 clients + 20 new,
# 100 rounds at fraction 0.1, every method on identical splits and budgets.
# Part B: rotated clusters (4 rotation groups, 40 clients): FedAvg, NIW FedHB (scaled and
# stale participation) and the mixture with components started from clustered updates.
# Each part has a time limit (seconds) so that a lease returns what finished; every run
# also prints its metrics line to the log as it ends.
set -u
DATA=${DATA:-../shared/data/mnist_t10k}
OUT=${OUT:-runs/deep_fl_gpu}
PART_A=${PART_A:-250}
PART_B=${PART_B:-200}
mkdir -p "$OUT"
common=(--data "$DATA" --device cuda --chunk-size 0 --cost-clients)
timeout "$PART_A" python3 benchmarks/deep_fl.py "${common[@]}" --alpha 0.1 0.5 --seeds 0 1 2 \
  --methods local pooled fedavg fedprox:mu=0.01 fedprox:mu=0.1 fedprox:mu=1 \
  "fedhb:family=iso,eps=0.1,participation=scaled,weighting=size" \
  "fedhb:family=diag,eps=0.1,participation=scaled,weighting=size" \
  "fedhb:family=iso,eps=0.1,participation=stale,weighting=equal" \
  ditto:lam=0.1 perfedavg:variant=fo \
  --out "$OUT/protocol" > "$OUT/protocol.log" 2>&1
echo "part A exit $?"
timeout "$PART_B" python3 benchmarks/deep_fl.py "${common[@]}" --scheme iid --rotations 4 \
  --clients 40 --new-clients 8 --fraction 0.25 --rounds 100 --local-epochs 5 --seeds 0 1 2 \
  --methods fedavg "fedhb:family=iso,participation=scaled,weighting=size" \
  "fedhb:family=iso,participation=stale,weighting=size" "mixture:cluster=5,hold=95" \
  --out "$OUT/rotated" > "$OUT/rotated.log" 2>&1
echo "part B exit $?"
