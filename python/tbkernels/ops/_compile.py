"""Helpers that check values, and torch.compile frames of their own.

Several helpers of the ops skip a value check while torch.compile traces
(``torch.compiler.is_compiling()``): a traced tensor has no value to check, and reading one
would break the graph. That is right while Dynamo traces a caller and inlines the helper. But
Dynamo also compiles a function as a frame of its own whenever it is *called from eager code*
while a compiled region runs: after Dynamo gives up on a frame ("Failed to handle graph break
gracefully. Skipping the function and falling back to eager", e.g. on the trace-time
ValueError of a bad sigma without ``fullgraph=True``), it runs that frame eagerly and compiles
each function it calls. Inside such a frame ``is_compiling()`` is true although the arguments
are real tensors with values, so the check was skipped and a bad input gave NaN instead of its
error (found 2026-11-22: ``flow_grpo_loss`` with ``sigma_next > sigma`` under ``torch.compile``
returned NaN).

:func:`inline_only` marks a helper's code so that Dynamo never starts a frame at it (it then
runs eagerly, checks included, whenever its caller does) while still inlining it into a
caller it traces, so compiled graphs are unchanged (same graphs, no added graph breaks).
"""
from __future__ import annotations

try:  # private, in torch >= 2.2: skip frame-level compilation of one code object
    from torch._dynamo.eval_frame import skip_code as _skip_code
except ImportError:  # (older torch: the behaviour before, checks skipped in such frames)
    _skip_code = None

# Qualified names of the functions marked, so that a test can check that every helper which
# consults is_compiling() is among them.
MARKED: set[str] = set()


def inline_only(fn):
    """Never compile ``fn`` as a torch.compile frame of its own; see the module docstring."""
    if _skip_code is not None:
        _skip_code(fn.__code__)
    MARKED.add(f"{fn.__module__}.{fn.__qualname__}")
    return fn
