"""Every CUDA and Triton kernel once, on small odd shapes: the workload compute-sanitizer runs under.

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize_cases.py --json out.json

Shapes are small (odd sizes, tails in every dimension) so memcheck / racecheck / synccheck finish in
minutes. Each case synchronises, so an error is reported against the case that caused it; the JSON says
which cases ran, which were skipped (backend not available, with the reason) and which raised.
Without a GPU every case is skipped (``--allow-cpu`` runs the Triton cases under the interpreter, to
check this script itself).
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback


def _cases(torch, vqk):
    dev = "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)

    cases = []
    for backend in ("cuda", "triton"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for (N, K, D) in ((37, 70, 13), (130, 257, 64), (5, 1030, 200)):
                def nc(backend=backend, dtype=dtype, N=N, K=K, D=D):
                    x, cb = rnd(N, D, dtype=dtype), rnd(K, D, dtype=dtype)
                    vqk.nearest_code(x, cb, backend=backend)
                    vqk.nearest_code(x, cb, metric="cosine", backend=backend)
                    if dtype == torch.float32:
                        vqk.nearest_code(x, cb, backend=backend, allow_tf32=True)
                cases.append((f"nearest_code[{backend},{dtype},{N}x{K}x{D}]", nc))

            def loss(backend=backend, dtype=dtype):
                z = rnd(3, 41, 24, dtype=dtype).requires_grad_()
                cb = rnd(67, 24, dtype=dtype).requires_grad_()
                idx = vqk.nearest_code(z.detach(), cb.detach(), backend=backend)
                zq, l = vqk.vq_loss(z, cb, idx, backend=backend)
                (zq.float().square().sum() + l).backward()
                vqk.code_stats(z.detach(), idx, 67, backend=backend)
                vqk.code_usage(idx, 67, backend=backend)
            cases.append((f"vq_loss+stats[{backend},{dtype}]", loss))

            # lfq_entropy: one tile and no split; several tiles, a row split and Z > 1; tiles narrower than 64
            for (N, C, d) in ((37, 2, 5), (300, 1, 14), (70, 3, 1)):
                def lfq(backend=backend, dtype=dtype, N=N, C=C, d=d):
                    x = (rnd(N, C, d, dtype=dtype) * 0.5).requires_grad_()
                    ps, cb = vqk.lfq_entropy(x, scale=4.0, backend=backend)
                    (0.7 * ps - 1.3 * cb).backward()
                cases.append((f"lfq_entropy[{backend},{dtype},{N}x{C}x{d}]", lfq))

            try:
                from vqkernels.ops.attention import attention, attention_with_kv_cache
            except Exception:  # noqa: BLE001 -- not in this checkout
                continue
            for (B, H, Hkv, Tq, Tk, Dh) in ((2, 4, 2, 37, 37, 64), (1, 3, 1, 5, 70, 128), (2, 2, 2, 129, 129, 40)):
                for causal in (False, True):
                    def att(backend=backend, dtype=dtype, B=B, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk, Dh=Dh, causal=causal):
                        q = rnd(B, H, Tq, Dh, dtype=dtype).requires_grad_()
                        k = rnd(B, Hkv, Tk, Dh, dtype=dtype).requires_grad_()
                        v = rnd(B, Hkv, Tk, Dh, dtype=dtype).requires_grad_()
                        attention(q, k, v, causal=causal, backend=backend).float().sum().backward()
                    cases.append((f"attention[{backend},{dtype},{B},{H},{Hkv},{Tq},{Tk},{Dh},causal={causal}]", att))

            def dec(backend=backend, dtype=dtype):
                B, H, Hkv, Tmax, Dh = 3, 4, 2, 300, 64
                kc, vc = rnd(B, Hkv, Tmax, Dh, dtype=dtype), rnd(B, Hkv, Tmax, Dh, dtype=dtype)
                lens = torch.tensor([1, 150, 300], dtype=torch.int32, device=dev)
                attention_with_kv_cache(rnd(B, H, 1, Dh, dtype=dtype), kc, vc, lens, backend=backend)
            cases.append((f"attention_with_kv_cache[{backend},{dtype}]", dec))
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write the per-case results here")
    p.add_argument("--only", default=None, help="run only the cases whose name contains this")
    args = p.parse_args(argv)
    import os

    # The kernels themselves run under the sanitizer, each case naming its backend; the self-check gate would
    # first run selftest's cases under it too (the selftest stage already checked them), doubling the time.
    os.environ.setdefault("VQKERNELS_SELFCHECK", "never")
    import torch

    import vqkernels as vqk
    from vqkernels import BackendNotSupported

    results = {}
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to sanitize")
        results["_"] = "skipped: no CUDA device"
        cases = []
    else:
        cases = _cases(torch, vqk)
    failed = 0
    for name, fn in cases:
        if args.only and args.only not in name:
            continue
        try:
            fn()
            torch.cuda.synchronize()
            results[name] = "ok"
        except BackendNotSupported as e:
            results[name] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 -- report every case, then fail at the end
            failed += 1
            results[name] = f"error: {type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"{name}: {results[name][:200]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"{sum(v == 'ok' for v in results.values())} ok, {failed} failed, "
          f"{sum(str(v).startswith('skipped') for v in results.values())} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
