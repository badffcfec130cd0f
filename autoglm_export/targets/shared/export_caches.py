"""Release what torch.export, ExecuTorch and the ONNX exporter keep of an export after it is done.

Each of them leaves the exported module's weights reachable from module globals or caches
(torch 2.13, executorch 1.x, onnxscript 0.x): with the decoder lowered in parts, every finished
part stayed in memory until the process ended (+0.33 GiB per 9B layer for xnnpack, +0.77 for
onnx, ~+1.1 for qnn's PT2E, bench/scale). None of it is used once a program is exported or lowered. These are
internals named by hand; tests/test_memory_guard.py fails if an upgrade moves them and the
weights stay alive.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys


def release_export_caches() -> None:
    """Drop every known reference an export or lowering leaves behind (~0.1 s: one gc scan)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    matcher = sys.modules.get("onnxscript.rewriter._matcher")
    pattern_matcher = matcher.PatternMatcher if matcher is not None else ()
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: gc also returns dead weak proxies
        if kind is ShapeEnv:
            # fake tensors that outlive the export (held from C++, invisible to gc) keep their mode's
            # ShapeEnv, whose tracked fakes and dispatch cache lead back to the real weights
            obj.tracked_fakes = None
            obj.fake_tensor_cache.clear()
        elif pattern_matcher and issubclass(kind, pattern_matcher):
            # onnxscript's module-level rewrite rules keep the graph and node of their last match,
            # and through them the exported model's initializers, which wrap the torch weights
            for attr in ("_graph", "_current_node", "_tracer", "_match"):
                if attr in vars(obj):
                    setattr(obj, attr, None)
    _release_torch_export()
    _release_executorch()
    _release_torchao()


def return_freed_memory() -> None:
    """Give the memory glibc holds in its free lists back to the OS. Freed tensors of a few MiB stay
    in the per-thread arenas (glibc raises its mmap threshold after each large free), where the next
    component cannot always reuse them: at 9B widths (qnn, one layer) the decoder part started with
    ~4 GiB more RSS without trims than with them. Not free: the next allocations fault their pages
    in again (a trim after every export and lowering made a tiny export 18% slower), so the pipeline
    calls it once per component. No-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl, macOS
        return None


def _release_torch_export() -> None:
    # strict export installs the module it captured, every weight with it, as a global of
    # functional_export and never removes it
    capture = sys.modules.get("torch._dynamo.functional_export")
    if capture is not None:
        names = vars(capture)
        for key in [k for k in names if k.startswith(("__compiled_fn_", "___unnamed_scope_"))]:
            del names[key]
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental import proxy_tensor
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # the last trace's fake tensor -> graph node map (refilled by each export, read right after it):
    # its nodes lead to the traced module; at 9B widths the vision encoder's fp32 weights (~1 GiB)
    # stayed alive through the next component
    proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT.clear()

    # ShapeEnv's lru_cache'd methods key on the ShapeEnv, whose tracked fakes hold the real weights
    for attr in vars(ShapeEnv).values():
        if hasattr(attr, "cache_clear"):
            attr.cache_clear()
    # fake-tensor dispatch results, cached per operator call with keys that hold the export's tensors
    FakeTensorMode.cache_clear()


def _release_executorch() -> None:
    backend_utils = sys.modules.get("executorch.exir.backend.utils")
    if backend_utils is None:
        return
    # the partitioner caches node comparisons by fx Node (whose meta leads to the ShapeEnv)
    backend_utils.is_same_node.cache_clear()
    # partitioner configs log rejections through module-level WhyNoPartition objects that keep the
    # last rejected node, and through it the lowered graph with all its weights
    for name, module in list(sys.modules.items()):
        if name.startswith("executorch.backends.") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, backend_utils.WhyNoPartition):
                    value.node = None


def _release_torchao() -> None:
    # functools caches keyed by the module (torchao's copy of torch.ao's helper, and torch.ao's own):
    # prepare_pt2e's and convert_pt2e's graph modules, with the fp32 weights and int8 codes of every
    # component (or decoder part) PT2E ever quantized
    for name, attr in (
        ("torchao.utils", "_assert_and_get_unique_device"),
        ("torch.ao.quantization.fx.utils", "assert_and_get_unique_device"),
    ):
        fn = getattr(sys.modules.get(name), attr, None)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
