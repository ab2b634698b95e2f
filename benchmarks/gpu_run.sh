#!/usr/bin/env bash
# Everything one device call does, so the GPU lease is spent in few, full calls.
# Usage (on the GPU machine, repo root, the kernels wheel carried in .whl/):
#   bash benchmarks/gpu_run.sh STAGE...   with STAGE in: iteration inference tests sanitizer tune bench family geometry dead standard gated transcoders sharded sharded_sanitizer trainers multi compare profile example quick analysis
# (tests: TESTS_K=<pytest -k expression> narrows them; sanitizer: SANITIZER_K likewise; profile: PROFILE="op B D F K dtype; ...")
# (multi: needs .bench_data/ids.npz and .bench_data/minilm6 from `python benchmarks/multi_sae.py prepare`)
# (compare: BEFORE=<checkout of an earlier commit> times both builds in one process)
# Logs and JSON land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/flash-sae-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import kernels" 2>/dev/null; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
entry=$(python3 build_local.py --env) || exit 1  # builds, prints LOCAL_KERNELS=<repo id>=<checkout>
export "$entry"
status=0
for stage in "$@"; do
  case "$stage" in
    tests)
      timeout ${TESTS_TIMEOUT:-480} python3 -m pytest tests ${TESTS_ARGS:-} ${TESTS_K:+-k "$TESTS_K"} -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.log" | tail -n 25
      status=$((status | PIPESTATUS[0]));;
    sanitizer)
      HYPOTHESIS_PROFILE=quick timeout ${SANITIZER_TIMEOUT:-420} compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 -m pytest tests -v -p no:cacheprovider -m kernels_ci \
        -k "not compile and not opcheck${SANITIZER_K:+ and ($SANITIZER_K)}" ${SANITIZER_ARGS:-} 2>&1 \
        | tee "$OUT/sanitizer.log" | tail -n 15
      status=$((status | PIPESTATUS[0]));;
    tune)
      timeout ${TUNE_TIMEOUT:-300} python3 benchmarks/tune.py --out "$OUT" ${TUNE_ONLY:+--only $TUNE_ONLY} > "$OUT/tune.log" 2>&1
      status=$((status | $?))
      tail -n 5 "$OUT/tune.log";;
    bench)
      timeout ${BENCH_TIMEOUT:-560} python3 benchmarks/side_by_side.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -n 70
      status=$((status | PIPESTATUS[0]));;
    family)
      timeout ${FAMILY_TIMEOUT:-420} python3 benchmarks/side_by_side.py --ops batchtopk_sae_step,jumprelu_sae_step,matryoshka_batchtopk_sae_step,matryoshka_topk_sae_step \
        --stem side_by_side_family --out "$OUT" 2>&1 | tee "$OUT/family.log" | tail -n 40
      status=$((status | PIPESTATUS[0]));;
    compare)
      timeout ${COMPARE_TIMEOUT:-400} python3 benchmarks/compare_builds.py --before "${BEFORE:-.baseline}" --out "$OUT" ${COMPARE_ARGS:-} 2>&1 \
        | tee "$OUT/compare.log" | tail -n 30
      status=$((status | PIPESTATUS[0]));;
    profile)  # PROFILE="op B D F K dtype; op B D F K dtype; ..."
      IFS=';' read -ra runs <<< "${PROFILE:-topk_sae_loss 2048 2304 65536 64 bf16}"
      for run in "${runs[@]}"; do
        # shellcheck disable=SC2086
        python3 benchmarks/profile_step.py $run >> "$OUT/profile.log" 2>&1
        status=$((status | $?))
      done
      grep -A 22 "10 steps" "$OUT/profile.log" | cut -c1-160;;
    iteration)  # the whole training iteration (step + Adam + norm steps + master copies), ITERATION_ARGS
      timeout ${ITERATION_TIMEOUT:-420} python3 benchmarks/training_iteration.py --out "$OUT" ${ITERATION_ARGS:-} 2>&1 \
        | tee "$OUT/iteration.log" | tail -n 12
      status=$((status | PIPESTATUS[0]));;
    inference)  # a TopK SAE's inference encode beside SAELens's SAE.encode, dense torch and torch.compile, INFERENCE_ARGS
      timeout ${INFERENCE_TIMEOUT:-420} python3 benchmarks/inference_encode.py --out "$OUT" ${INFERENCE_ARGS:-} 2>&1 \
        | tee "$OUT/inference.log" | tail -n 12
      status=$((status | PIPESTATUS[0]));;
    analysis)  # LatentAnalysis beside the dense formulation; SAE_DASHBOARD=<folder with sae-dashboard, --no-deps> adds its runner
      timeout ${ANALYSIS_TIMEOUT:-560} python3 benchmarks/latent_analysis.py --out "$OUT" \
        ${SAE_DASHBOARD:+--sae-dashboard "$SAE_DASHBOARD"} ${ANALYSIS_ARGS:-} 2>&1 | tee "$OUT/analysis.log" | tail -n 12
      status=$((status | PIPESTATUS[0]));;
    example)
      python3 example.py 2>&1 | tee "$OUT/example.log" | tail -n 12
      status=$((status | PIPESTATUS[0]));;
    geometry)
      timeout ${GEOMETRY_TIMEOUT:-300} python3 benchmarks/decoder_geometry.py --out "$OUT" 2>&1 | tee "$OUT/geometry.log" | tail -n 12
      status=$((status | PIPESTATUS[0]));;
    dead)
      timeout ${DEAD_TIMEOUT:-420} python3 benchmarks/dead_latents.py --out "$OUT" 2>&1 | tee "$OUT/dead.log" | tail -n 30
      status=$((status | PIPESTATUS[0]));;
    standard)
      timeout ${STANDARD_TIMEOUT:-420} python3 benchmarks/standard_sae_step.py --out "$OUT" 2>&1 | tee "$OUT/standard.log" | tail -n 40
      status=$((status | PIPESTATUS[0]));;
    gated)
      timeout ${GATED_TIMEOUT:-420} python3 benchmarks/standard_sae_step.py --arch gated --out "$OUT" 2>&1 | tee "$OUT/gated.log" | tail -n 60
      status=$((status | PIPESTATUS[0]));;
    transcoders)  # transcoders, skip transcoders, CLTs and crosscoders beside dense torch, torch.compile and the peers
      timeout ${TRANSCODERS_TIMEOUT:-560} python3 benchmarks/transcoders.py --out "$OUT" ${TRANSCODERS_ARGS:-} 2>&1 \
        | tee "$OUT/transcoders.log" | grep -v "^  " | tail -n 60
      status=$((status | PIPESTATUS[0]));;
    sharded)  # the latent-sharded step over 1, 2 and 4 GPUs (SHARDED_RUNS="nproc data_world features; ...")
      IFS=';' read -ra runs <<< "${SHARDED_RUNS:-1 1 2097152; 2 1 2097152,4194304; 4 1 2097152,8388608; 4 2 4194304}"
      for run in "${runs[@]}"; do
        read -r nproc dw feats <<< "$run"
        [ "$nproc" -le "$(nvidia-smi -L | wc -l)" ] || { echo "skip $run: fewer GPUs"; continue; }
        timeout ${SHARDED_TIMEOUT:-240} python3 -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
          benchmarks/sharded_topk_sae_step.py --data-world "$dw" --features "$feats" --out "$OUT" 2>&1 \
          | tee -a "$OUT/sharded.log" | grep -E "ranks|Error|error" | tail -n 8
        status=$((status | PIPESTATUS[0]))
      done;;
    sharded_sanitizer)  # memcheck over the sharded step's test on 2 GPUs (NCCL), every spawned rank
      timeout ${SANITIZER_TIMEOUT:-420} compute-sanitizer --tool memcheck --target-processes all --error-exitcode 9 \
        python3 -m pytest tests/test_sharded_topk_sae_step.py -q -p no:cacheprovider \
        -k "${SANITIZER_K:-matches_single and 2}" 2>&1 | tee "$OUT/sharded_sanitizer.log" | tail -n 15
      status=$((status | PIPESTATUS[0]));;
    trainers)  # SAELens's and sparsify's trainers against flash-sae's loop (needs .bench_data from `prepare`)
      timeout ${TRAINERS_TIMEOUT:-540} python3 benchmarks/trainers_side_by_side.py run --out "$OUT" ${TRAINERS_ARGS:-} 2>&1 \
        | tee "$OUT/trainers.log" | grep -v "^Traceback\|^  " | tail -n 30
      status=$((status | PIPESTATUS[0]));;
    multi)  # six SAEs (MiniLM's layers) from one forward vs six sequential runs and SAELens's MultiSAETrainingRunner
      timeout ${MULTI_TIMEOUT:-560} python3 benchmarks/multi_sae.py run --out "$OUT" ${MULTI_ARGS:-} 2>&1 \
        | tee "$OUT/multi.log" | grep -v "^Traceback\|^  " | tail -n 12
      status=$((status | PIPESTATUS[0]));;
    quick)
      python3 benchmarks/side_by_side.py --quick --out "$OUT" 2>&1 | tail -n 20;;
    *) echo "unknown stage $stage"; exit 2;;
  esac
done
exit $status
