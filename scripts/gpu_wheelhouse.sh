#!/usr/bin/env bash
# The peers the GPU benchmarks and tests compare against, as Python 3.12 manylinux wheels in .whl/
# (git-ignored), for a GPU machine with no network: run this here (it reaches PyPI), then carry `.whl`
# with each device command; scripts/gpu_check.sh installs them with --no-index into /tmp/vqk-peers.
# The GPU image already has torch, torchvision, pytorch-lightning, transformers, numpy, PyYAML, tqdm,
# sympy and packaging, so only what it lacks is fetched (about 30 MB; the device tool carries 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PKGS=(
  taming-transformers-rom1504==0.0.6 omegaconf==2.4.0
  vector-quantize-pytorch==1.32.0 einx==0.4.3 frozendict loguru torch-einops-utils
  faiss-cpu==1.15.1
)
PLATS=()
for n in 17 24 27 28 31 34; do PLATS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for p in "${PKGS[@]}"; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATS[@]}" -d .whl "$p" || echo "could not fetch $p as a wheel (its rows will be skipped on the GPU)"
done
du -sh .whl; ls .whl
