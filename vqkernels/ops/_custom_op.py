"""``torch.library.custom_op``, minus the ~0.9 s its first eager call costs on a CPU-only path.

torch wraps every custom op's implementation in ``torch._disable_dynamo``, which imports
``torch._dynamo`` on the op's first call (and with it sympy, triton and parts of inductor: ~0.9 s
and ~150 MB of RSS measured with ``python -X importtime``), although Dynamo can only be tracing
when it has already been imported. So until something imports it (``torch.compile``, or any other
user of Dynamo), the implementation is called directly; from then on through ``torch._dynamo.disable``
exactly as torch does. A torch version without the hook this relies on keeps torch's behaviour (only
the first call is slower), so nothing here can change a result.
"""
from __future__ import annotations

import sys

import torch


def custom_op(qualname: str, *, mutates_args):
    """Decorator: ``torch.library.custom_op(qualname, mutates_args=...)`` with a cheap first eager call."""

    def deco(fn):
        op = torch.library.custom_op(qualname, mutates_args=mutates_args)(fn)
        _defer_dynamo_import(op)
        return op

    return deco


def _defer_dynamo_import(op) -> None:
    # custom_op stores ``torch._disable_dynamo(wrapped_fn)`` as the implementation; that wrapper
    # looks for an already-built ``wrapped_fn.__dynamo_disable`` before importing Dynamo to build one.
    try:
        fn = op._backend_fns[None].__wrapped__
    except (AttributeError, KeyError, TypeError):
        return
    disabled = []

    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:  # nothing can be tracing: no need to hide the body from Dynamo
            return fn(*args, **kwargs)
        if not disabled:
            import torch._dynamo

            disabled.append(torch._dynamo.disable(fn, recursive=True, wrapping=False))
        return disabled[0](*args, **kwargs)

    setattr(fn, "__dynamo_disable", call)
