#!/usr/bin/env bash
# The checks that need a CUDA device, in one run, with timings: for a session that has
# a GPU. Run from the repository root after `bash scripts/setup.sh`:
#
#   bash scripts/gpu_check.sh            # about 5 minutes on one GPU
#   DEVICE=cpu bash scripts/gpu_check.sh # the same steps on CPU, to check the script
#
# It prints the GPU, runs every test that skips without CUDA (merge kernels on CUDA
# against CPU, the Evo-L2S population backend against sequential decoding on CUDA),
# then times the Evo-L2S fitness backends and one TIES merge with --device cuda.
# Nothing here downloads weights: the models are the ones the tests and benchmarks build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
merge=${MERGE:-.venv/bin/merge}
device=${DEVICE:-cuda}

"$python" - "$device" <<'EOF'
import sys
import torch
if sys.argv[1] == "cpu":
    print("DEVICE=cpu: the CUDA tests skip and the timings run on CPU")
elif not torch.cuda.is_available():
    raise SystemExit(f"No CUDA device: torch {torch.__version__} sees none. Install a CUDA build of torch, or set DEVICE=cpu to check the script.")
else:
    print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
EOF

echo "== tests that need CUDA"
"$python" -m pytest -q -rs tests/methods/test_kernels.py tests/evo/test_population.py -k cuda

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== Evo-L2S fitness backends on $device, small reasoning zoo (candidates per minute)"
"$merge" --device cpu zoo build reasoning --small --output "$work/reasoning" > /dev/null
"$python" scripts/bench_evo.py --zoo "$work/reasoning" --device "$device"

echo "== TIES on $device, tiny Llama-shaped checkpoints"
"$python" - "$work" <<'EOF'
import sys
from pathlib import Path
from mergekit_ext.tiny import write_tiny_checkpoint
root = Path(sys.argv[1])
for index in range(4):
    write_tiny_checkpoint(root / f"m{index}", "llama", seed=index, num_layers=4, hidden=256, vocab_size=4096)
EOF
for run in cpu "$device"; do
  TIMEFORMAT="TIES --device $run: %R s"
  time "$merge" --device "$run" ties --base "$work/m0" --models "$work/m1" "$work/m2" "$work/m3" \
    --density 0.5 --output "$work/ties-$run" --force > /dev/null
done
"$python" - "$work" "$device" <<'EOF'
import sys
from safetensors.torch import load_file
root, device = sys.argv[1], sys.argv[2]
cpu = load_file(f"{root}/ties-cpu/model.safetensors")
other = load_file(f"{root}/ties-{device}/model.safetensors")
worst = max(float((cpu[name].float() - other[name].float()).abs().max()) for name in cpu)
print(f"TIES on CPU against {device}: largest difference {worst:.2e} over {len(cpu)} tensors")
EOF
