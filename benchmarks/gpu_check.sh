#!/usr/bin/env bash
# The GPU check (issue 19), one short script for a lent accelerator (the `device` tool) or a
# user's GPU box:
#   1. installs what the machine lacks from wheels carried in .whl/ (if that folder exists),
#   2. prints JAX's and PyTorch's versions and devices,
#   3. trains the default DeepLab a few hundred steps in bfloat16 under both parallelism
#      modes ('jit', 'pmap'), evaluating at the end (the GPU paths of the trainer),
#   4. checks that the two kernel formulations agree on this backend (tests/test_layers.py),
#   5. runs benchmarks/vs_pytorch.py in bfloat16, printing each side's % of peak (MFU),
#   6. times every family's inference (benchmarks/latency.py, bfloat16) and the attention
#      formulations (--attention: einsum vs jax.nn.dot_product_attention's fused kernel).
# Figures and logs go to $OUT (or ./gpu_check_out). DEVICE=cpu rehearses it on a CPU with
# tiny settings (STEPS, BENCH override the sizes).
set -uo pipefail
cd "$(dirname "$0")/.."
device=${DEVICE:-gpu}
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ "$device" = cpu ]; then
  steps=${STEPS:-20}; bench=${BENCH:-unet:2x64,deeplabv3_r50:2x64,vit_ti_segmenter:2x64}
  latency=${LATENCY:---size 64 --batch_size 2 --steps 2}
else
  steps=${STEPS:-600}; bench=${BENCH:-unet:32x256,deeplabv3_r50:16x512,vit_ti_segmenter:64x256}
  latency=${LATENCY:---size 512 --batch_size 16 --steps 20}
fi
status=0
python3 -c 'import jax, torch; print("jax", jax.__version__, jax.devices()); print("torch", torch.__version__, torch.cuda.is_available())' \
  2>&1 | tee "$out/versions.txt" || status=1
for parallelism in jit pmap; do
  timeout 400 python3 launch.py --config experiments/deeplab.py --config.half_precision=True \
    --config.parallelism=$parallelism --config.total_steps=$steps --config.warmup_steps=0 \
    --config.eval_every=$steps --config.checkpoint_every=$steps --config.log_every=$((steps / 4 > 0 ? steps / 4 : 1)) \
    --workdir "/tmp/gpu_check_$parallelism" 2>&1 | tail -25 | tee "$out/train_$parallelism.txt" \
    || status=1
done
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_layers.py -k same_outputs_and_gradients 2>&1 \
  | tail -5 | tee "$out/formulations.txt" || status=1
timeout 400 python3 benchmarks/vs_pytorch.py --device "$device" --half_precision --models "$bench" \
  --steps 10 --warmup 3 --pipeline_batches 10 2>&1 | tee "$out/bench_bf16.txt" || status=1
for mode in "" --attention; do
  # shellcheck disable=SC2086  # $latency holds several flags
  timeout 400 python3 benchmarks/latency.py --half_precision $latency $mode 2>&1 \
    | grep -v '^[IW][0-9]' | tee "$out/latency${mode:+_attention}.txt" || status=1
done
exit $status
