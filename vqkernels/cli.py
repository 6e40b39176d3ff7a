"""The `vqkernels` command.

    vqkernels info                 versions, device, what _C was built with, the backend each op picks
    vqkernels bench [options]      the benchmark suite (defaults: this machine's sizes); see --help
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import vqkernels

    if args.json:
        print(json.dumps(vqkernels.info(), indent=2, default=str))
    else:
        print(vqkernels.info(as_text=True))
    return 0


def _cmd_bench(args) -> int:
    from .bench import runner

    return int(runner.run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqkernels", description="Fused vector-quantization kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="versions, device, build and backend choice")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(func=_cmd_info)
    pb = sub.add_parser("bench", help="run the benchmark suite and write stamped CSV/JSON/plot")
    try:
        from .bench import runner

        runner.add_arguments(pb)
    except ImportError as e:  # pragma: no cover -- the bench package ships with vqkernels
        pb.add_argument("--_unavailable", default=str(e))
    pb.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
