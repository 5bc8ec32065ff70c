"""Compile every Triton kernel specialization the wrappers launch, for NVIDIA GPUs, without a GPU.

The Triton interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but never runs
Triton's compiler: a kernel can pass every interpreter test and still fail to compile, or compile
to code that spills registers or does not vectorize its loads. This tool closes that gap on a
machine without a GPU:

1. It drives the three wrappers (flow_step forward/backward, group_advantages, per_sample_mse
   forward/backward) on CPU tensors over a matrix of dtypes, shapes and options, under
   ``_launch.assume_gpu`` so they plan the tiles a GPU would get. ``JITFunction.run`` is replaced
   by a recorder: each launch is specialized exactly as Triton's launcher would specialize it for
   the target (argument types, 16-byte divisibility, constexprs, num_warps), and not run.
2. Each distinct specialization is compiled with ``triton.compile`` for each target (default sm_80
   and sm_90), in parallel worker processes, down to a cubin (Triton's bundled ptxas).
3. It reports, per compiled kernel, registers, spill/stack bytes (``cuobjdump -res-usage``),
   shared memory, and how many global loads/stores in the PTX are 128-bit vectors.

    python -m tbkernels.kernels.compile_check                 # full matrix, sm_80 + sm_90
    python -m tbkernels.kernels.compile_check --quick --arch 90 --json out.json

Exit status 1 if anything fails to compile or spills. Must run *without* TRITON_INTERPRET=1 (the
kernels must be ``JITFunction`` objects); ``tests/test_triton_compile.py`` runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch


@dataclasses.dataclass
class Launch:
    """One specialization of one kernel for one target, as Triton's launcher would compile it."""
    module: str
    kernel: str
    arch: int
    signature: Dict[str, str]
    constexprs: List[Tuple[Tuple[int, ...], object]]
    attrs: List[Tuple[Tuple[int, ...], object]]
    options: Dict[str, object]          # the launch's own compile options (num_warps, ...)
    case: str                           # the first wrapper call that produced it

    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.arch, self.signature,
                           [[list(p), repr(v)] for p, v in self.constexprs],
                           [[list(p), repr(v)] for p, v in self.attrs],
                           sorted(self.options.items())], default=repr)

    def label(self) -> str:
        const = {}
        names = list(self.signature)
        for path, value in self.constexprs:
            const[names[path[0]]] = value
        shown = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in const.items())
        types = ",".join(t for t in self.signature.values() if t.startswith("*"))
        return f"{self.kernel}[{types}] {shown} warps={self.options.get('num_warps', 4)}"


class Recorder:
    """Replaces ``JITFunction.run``: specializes each launch for every target and records it."""

    def __init__(self, archs: List[int]):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.archs = archs
        self.backends = {a: make_backend(GPUTarget("cuda", a, 32)) for a in archs}
        self.launches: Dict[str, Launch] = {}
        self.case = ""
        self._binders = {}

    def run(self, fn, args, kwargs):
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        launch_options = {k: v for k, v in kwargs.items()
                          if k not in {p.name for p in fn.params}
                          and k not in ("debug", "instrumentation_mode")}
        for arch, backend in self.backends.items():
            binder = self._binders.get((id(fn), arch))
            if binder is None:
                binder = create_function_from_signature(fn.signature, fn.params, backend)
                self._binders[(id(fn), arch)] = binder
            bound, specialization, options = binder(*args, **kwargs)
            _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                            specialization, options)
            launch = Launch(fn.fn.__module__, fn.fn.__qualname__, arch, dict(signature),
                            sorted(constexprs.items()), sorted(attrs.items()), launch_options,
                            self.case)
            self.launches.setdefault(launch.key(), launch)

    def __enter__(self):
        from triton.runtime.jit import JITFunction
        recorder = self
        self._saved = JITFunction.run

        def recording_run(fn, *args, grid, warmup, **kwargs):
            recorder.run(fn, args, kwargs)
            return None
        JITFunction.run = recording_run
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction
        JITFunction.run = self._saved
        return False


# ----------------------------------------------------------------------------------------------
# The matrix of wrapper calls
# ----------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


# Mixed dtypes of the flow-step ops: "model/latent", a bf16 (fp16) model_output and reference
# beside float32 latents (sample, prev / noise, grad_mean), as Flow-GRPO trains.
MIXED_DTYPES = ["bf16/fp32", "fp16/fp32"]


def _latent_pair(dname: str):
    """(model_output dtype, latent dtype) of a dtype name: "bf16" or a mixed "bf16/fp32"."""
    model, _, latent = dname.partition("/")
    return DTYPES[model], DTYPES[latent or model]


def _flow_step_cases(quick: bool):
    from tbkernels.kernels import flow_step as fs
    # Wan 480p (S divisible by 16: vectorized), an image latent, and an odd shape (masked tails)
    shapes = {"wan480p": (2, 16, 21, 60, 104), "image": (3, 4, 32, 32), "odd": (1, 3, 5, 7, 9)}
    dtypes = ["fp32", "bf16", "bf16/fp32"] if quick else list(DTYPES) + MIXED_DTYPES
    for (sname, shape), dname in itertools.product(shapes.items(), dtypes):
        mt, dt = _latent_pair(dname)
        v, x = torch.empty(shape, dtype=mt), torch.empty(shape, dtype=dt)
        coefs = torch.empty(shape[0], 5, dtype=torch.float64 if dt == torch.float64
                            else torch.float32)
        acc = coefs.dtype
        flags = itertools.product((0, 1, 2), (False, True), (False, True), (False, True),
                                  (False, True))
        for reduction, sampling, write_mean, has_pn, has_ref in flags:
            if quick and sname != "wan480p" and (write_mean or has_ref):
                continue
            if quick and "/" in dname and not (has_pn and write_mean == sampling):
                continue            # mixed, quick: training (stored prev) and sampling (noise)
            yield (f"flow_step_forward {sname} {dname} r={reduction} sampling={sampling} "
                   f"mean={write_mean} pn={has_pn} ref={has_ref}",
                   lambda v=v, x=x, c=coefs, r=reduction, s=sampling, m=write_mean, p=has_pn,
                   f=has_ref: fs.flow_step_forward_triton(v, x, x if p else None, v if f else None,
                                                          c, r, s, m))
        for reduction, has_gl, has_gm, has_ref in itertools.product(
                (0, 1, 2), (False, True), (False, True), (False, True)):
            if not (has_gl or has_gm or has_ref):
                continue
            if quick and sname != "wan480p" and (has_gm or has_ref):
                continue
            if quick and "/" in dname and not has_gl:
                continue
            gl = torch.empty(fs._logp_shape(shape, reduction), dtype=acc) if has_gl else None
            gq = torch.empty(shape[0], dtype=acc) if has_ref else None
            yield (f"flow_step_backward {sname} {dname} r={reduction} gl={has_gl} gm={has_gm} "
                   f"ref={has_ref}",
                   lambda v=v, x=x, c=coefs, r=reduction, gl=gl, gm=has_gm, f=has_ref, gq=gq:
                   fs.flow_step_backward_triton(v, x, x, v if f else None, c, r, gl,
                                                x if gm else None, gq))


def _flow_grpo_surrogate_cases(quick: bool):
    from tbkernels.kernels import flow_step as fs
    dtypes = ["fp32"] if quick else ["fp32", "fp64"]
    # B = 8 (one partial block) and 3000 (three passes of the 1024-sample block)
    for dname, B in itertools.product(dtypes, (8, 3000)):
        t = torch.empty(B, dtype=DTYPES[dname])
        for has_ref, beta, simple in ((True, 0.04, False), (True, 0.0, False), (False, 0.0, False),
                                      (True, 0.04, True)):
            if quick and B != 8 and not (has_ref and beta):
                continue
            yield (f"flow_grpo_surrogate {dname} B={B} ref={has_ref} beta={beta} simple={simple}",
                   lambda t=t, r=has_ref, b=beta, s=simple: fs.flow_grpo_surrogate_triton(
                       t, t if r else None, t if r else None, t, t, 1e-4, 5.0, b, s))


def _flow_grpo_map_surrogate_cases(quick: bool):
    from tbkernels.kernels import flow_step as fs
    dtypes = ["fp32"] if quick else ["fp32", "fp64"]
    # per position at Wan 480p B = 8 (one map per sample, and one shared by the batch), and per
    # element at 720p (int64 offsets above 2**31 positions are not reached at these sizes)
    sizes = {"pos480p": (8, 21 * 60 * 104), "elem720p": (8, 16 * 21 * 90 * 160)}
    for (sname, (B, P)), dname in itertools.product(sizes.items(), dtypes):
        lp = torch.empty(B, P, dtype=DTYPES[dname])
        b = torch.empty(B, dtype=DTYPES[dname])
        for shared, has_ref, beta, simple in ((False, True, 0.04, False), (True, False, 0.0, False),
                                              (False, True, 0.04, True)):
            if quick and sname != "pos480p" and simple:
                continue
            yield (f"flow_grpo_map_surrogate {sname} {dname} shared={shared} ref={has_ref} "
                   f"simple={simple}",
                   lambda lp=lp, b=b, sh=shared, r=has_ref, be=beta, s=simple:
                   fs.flow_grpo_map_surrogate_triton(lp, b if r else None, b if r else None, lp, b,
                                                     lp[:1] if sh else lp, 1e-4, 5.0, be, s))


def _flow_grpo_elem_loss_cases(quick: bool):
    from tbkernels.kernels import flow_step as fs
    # a Wan 480p latent (N = C*S divisible by 16: vectorized) and an odd one (masked tails); the
    # size names avoid "wan480p", which selects the step kernels' cases in the compile tests
    shapes = {"elem480p": (2, 16, 21, 60, 104), "odd": (3, 5, 7, 9)}
    dtypes = ["fp32", "bf16", "bf16/fp32"] if quick else list(DTYPES) + MIXED_DTYPES
    # (shared map, reference, beta, simple, write_grad): training with the KL in the loss, no
    # reference with a batch-shared map, a metric-only reference without the gradient, simple
    variants = ((False, True, 0.04, False, True), (True, False, 0.0, False, True),
                (False, True, 0.0, False, False), (False, True, 0.04, True, True))
    for (sname, shape), dname in itertools.product(shapes.items(), dtypes):
        mt, dt = _latent_pair(dname)
        v, x = torch.empty(shape, dtype=mt), torch.empty(shape, dtype=dt)
        acc = torch.float64 if dt == torch.float64 else torch.float32
        B, N = shape[0], v[0].numel()
        coefs = torch.empty(B, 5, dtype=acc)
        rows, b = torch.empty(B, N, dtype=acc), torch.empty(B, dtype=acc)
        for shared, has_ref, beta, simple, grad in variants:
            if quick and sname != "elem480p" and (simple or not grad):
                continue
            yield (f"flow_grpo_elem_loss {sname} {dname} shared={shared} ref={has_ref} "
                   f"beta={beta} simple={simple} grad={grad}",
                   lambda v=v, x=x, c=coefs, rows=rows, b=b, sh=shared, r=has_ref, be=beta,
                   s=simple, g=grad: fs.flow_grpo_elem_loss_triton(
                       v, x, x, v if r else None, c, b if r else None, rows, b,
                       rows[:1] if sh else rows, 1e-4, 5.0, be, s, g))
        if acc == torch.float32:
            # old_log_prob and the map stored in bf16 / fp16 (widened on load), training variant
            for rdt in (torch.bfloat16, torch.float16):
                if quick and (sname != "elem480p" or rdt == torch.float16):
                    continue
                low = rows.to(rdt)
                yield (f"flow_grpo_elem_loss {sname} {dname} rows={str(rdt)[6:]}",
                       lambda v=v, x=x, c=coefs, low=low, b=b: fs.flow_grpo_elem_loss_triton(
                           v, x, x, v, c, b, low, b, low, 1e-4, 5.0, 0.04, False, True))


def _group_advantages_cases(quick: bool):
    from tbkernels.kernels import group_advantages as ga
    # (B, K, group size, with explicit ids): fused contiguous path, long groups (row kernels), ids
    layouts = [(64 * 16, 1, 16, False), (24, 3, 8, False), (4096, 1, 4096, False),
               (777, 2, 1, True)]
    dtypes = ["fp32", "fp64"] if quick else list(DTYPES)
    for (B, K, S, ids), dname in itertools.product(layouts, dtypes):
        x = torch.zeros(B, K, dtype=DTYPES[dname])
        G = 7 if ids else B // S
        gid = torch.arange(B) % G if ids else None
        for std_mode, ddof, clip, check in itertools.product((0, 1, 2), (0, 1), (0.0, 5.0),
                                                             (False, True)):
            if quick and (ddof == 0 or clip == 0.0) and std_mode != 1:
                continue
            yield (f"group_advantages B={B} K={K} S={S} ids={ids} {dname} std={std_mode} "
                   f"ddof={ddof} clip={clip} check={check}",
                   lambda x=x, g=gid, S=S, G=G, m=std_mode, d=ddof, c=clip, k=check:
                   ga.group_advantages_triton(x, g, S, G, m, d, 1e-6, c, check_finite=k))


def _per_sample_mse_cases(quick: bool):
    from tbkernels.kernels import per_sample_mse as km
    shapes = {"wan480p": (2, 16, 21, 60, 104), "odd": (3, 5, 7, 9)}
    # fp32/bf16: pred the wider type, the pair whose backward tile had to be chosen against a
    # shared-memory layout conversion (per_sample_mse._backward_gpu_tile).
    pairs = ([("bf16", "bf16"), ("fp32", "fp32"), ("fp32", "bf16")] if quick else
             [(a, b) for a in DTYPES for b in DTYPES])
    for (sname, shape), (pa, pb) in itertools.product(shapes.items(), pairs):
        p, t = torch.empty(shape, dtype=DTYPES[pa]), torch.empty(shape, dtype=DTYPES[pb])
        acc = torch.float64 if torch.float64 in (p.dtype, t.dtype) else torch.float32
        g = torch.empty(shape[0], dtype=acc)
        yield (f"per_sample_mse {sname} {pa}/{pb}", lambda p=p, t=t: km.per_sample_mse_forward_triton(p, t))
        yield (f"per_sample_mse_backward {sname} {pa}/{pb}",
               lambda p=p, t=t, g=g: km.per_sample_mse_backward_triton(g, p, t))


def record(archs: List[int], quick: bool, sms: int, only: Optional[str] = None) -> List[Launch]:
    from tbkernels.kernels import _launch
    recorder = Recorder(archs)
    with recorder, _launch.assume_gpu(sms):
        for cases in (_flow_step_cases, _flow_grpo_surrogate_cases,
                      _flow_grpo_map_surrogate_cases, _flow_grpo_elem_loss_cases,
                      _group_advantages_cases, _per_sample_mse_cases):
            for case, call in cases(quick):
                if only is not None and not case.startswith(only):
                    continue
                recorder.case = case
                call()
    return list(recorder.launches.values())


# ----------------------------------------------------------------------------------------------
# Compilation (worker processes)
# ----------------------------------------------------------------------------------------------

# A subroutine call (the slow path of IEEE-exact division, div.rn) makes ptxas keep a register
# on the stack across it: a few bytes per thread (one STL/LDL pair), not register pressure.
# Anything on the stack in a kernel without calls, more than this, or any local array fails.
CALL_STACK_BYTES = 16

_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)")


def cubin_resources(path: str) -> Dict[str, Dict[str, int]]:
    """Per kernel in a cubin: registers, stack and local bytes (``cuobjdump -res-usage``), and
    the spill stores (STL) and subroutine calls in its SASS (``cuobjdump -sass``)."""
    tool = _nvidia_tool("cuobjdump")
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
    sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    if usage.returncode or sass.returncode:
        raise RuntimeError(f"cuobjdump failed on {path}: {usage.stderr[-500:]}{sass.stderr[-500:]}")
    out = {name: dict(registers=int(r), stack=int(st), local=int(lo))
           for name, r, st, lo in _RES.findall(usage.stdout)}
    if not out:
        raise RuntimeError(f"cuobjdump -res-usage listed no kernel in {path}: {usage.stdout[-500:]}")
    for part in re.split(r"\n\s*Function : ", sass.stdout)[1:]:
        name, body = part.split("\n", 1)
        if name.strip() in out:
            out[name.strip()].update(sass_spill_stores=len(re.findall(r"\bSTL\b", body)),
                                     sass_calls=len(re.findall(r"\bCALL\.", body)))
    for rec in out.values():
        rec.setdefault("sass_spill_stores", 0)
        rec.setdefault("sass_calls", 0)
    return out


def spills(rec: Dict[str, int]) -> bool:
    """Register spills or local arrays, beyond a call's saved register (see CALL_STACK_BYTES)."""
    return bool(rec["local"] or (rec["stack"] and not rec["sass_calls"])
                or rec["stack"] > CALL_STACK_BYTES)


def _nvidia_tool(name: str) -> str:
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def _access_counts(ptx: str) -> Dict[str, object]:
    """Global loads/stores in the PTX: all, 128-bit vectors, and the masked (predicated) ones that
    are not vectors. Masked accesses are the per-element tile accesses; unmasked scalar loads are
    per-program parameters (coefficients). A latent kernel with 16-divisible rows should have no
    narrow masked access other than its one float64 partial store."""
    out: Dict[str, object] = {}
    narrow = set()
    for op in ("ld", "st"):
        n = n_vec = 0
        for pred, inst in re.findall(rf"(@%p\d+\s+)?\b({op}\.global(?:\.[A-Za-z0-9_:]+)*)", ptx):
            n += 1
            vector = ".v4." in inst + "." or ".v2.b64" in inst + "."
            n_vec += vector
            if pred and not vector:
                narrow.add(re.sub(r"\.(L1|L2)::[A-Za-z0-9_:]+", "", inst))
        out[f"{op}_global"], out[f"{op}_global_v4"] = n, n_vec
    out["narrow_masked"] = sorted(narrow)
    return out


def compile_one(launch: Launch) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    result = dict(module=launch.module, kernel=launch.kernel, arch=launch.arch, label=launch.label(), case=launch.case,
                  ok=False, error=None)
    start = time.perf_counter()
    try:
        src = ASTSource(fn, dict(launch.signature), dict(launch.constexprs), dict(launch.attrs))
        compiled = triton.compile(src, target=GPUTarget("cuda", launch.arch, 32),
                                  options=dict(launch.options))
    except Exception as exc:  # reported, and the run fails
        result["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        return result
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["shared"] = compiled.metadata.shared
    result["num_warps"] = compiled.metadata.num_warps
    result.update(_access_counts(compiled.asm["ptx"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        try:
            usage = cubin_resources(f.name)
        except RuntimeError as exc:
            result["error"] = str(exc)
            return result
    if len(usage) != 1:
        result["error"] = f"expected one kernel in the cubin, found {sorted(usage)}"
        return result
    result.update(next(iter(usage.values())))
    result["ok"] = True
    return result


def compile_all(launches: List[Launch], jobs: int, progress=print) -> List[dict]:
    results = []
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(compile_one, launch) for launch in launches]
        for i, fut in enumerate(cf.as_completed(futures), 1):
            results.append(fut.result())
            if progress and (i % 25 == 0 or i == len(futures)):
                progress(f"  compiled {i}/{len(futures)}")
    results.sort(key=lambda r: (r["kernel"], r["arch"], r["label"]))
    return results


def problems(results: List[dict]) -> List[str]:
    bad = []
    for r in results:
        if not r["ok"]:
            bad.append(f"sm_{r['arch']} {r['label']} ({r['case']}): {r['error']}")
        elif spills(r):
            bad.append(f"sm_{r['arch']} {r['label']} ({r['case']}): spills "
                       f"(stack {r['stack']} B, local {r['local']} B, {r['registers']} registers, "
                       f"{r['sass_spill_stores']} STL, {r['sass_calls']} calls)")
    return bad


def summary_table(results: List[dict]) -> str:
    """Per kernel and target: how many specializations, max registers, spills, shared memory."""
    rows = {}
    for r in results:
        if not r["ok"]:
            continue
        k = (r["module"], r["kernel"], r["arch"])
        row = rows.setdefault(k, dict(n=0, regs=0, stack=0, local=0, shared=0, secs=0.0))
        row["n"] += 1
        row["regs"] = max(row["regs"], r["registers"])
        row["stack"] = max(row["stack"], r["stack"])
        row["local"] = max(row["local"], r["local"])
        row["shared"] = max(row["shared"], r["shared"])
        row["secs"] += r["seconds"]
    lines = ["| kernel | target | specializations | max registers | max stack B | max local B "
             "| max shared B |", "|---|---|---:|---:|---:|---:|---:|"]
    for (module, kernel, arch), row in sorted(rows.items()):
        lines.append(f"| {module.rsplit('.', 1)[-1]}.{kernel} | sm_{arch} | {row['n']} | "
                     f"{row['regs']} | {row['stack']} | {row['local']} | {row['shared']} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller matrix (fp32/bf16 latents, the options training uses)")
    parser.add_argument("--sms", type=int, default=132, help="SM count to plan tiles for")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write every compiled kernel's record here")
    parser.add_argument("--only", help="only the wrapper calls whose case name starts with this "
                                       "(e.g. flow_grpo_surrogate, per_sample_mse)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: the interpreter replaces the compiler")

    import triton
    t0 = time.perf_counter()
    launches = record(args.arch, args.quick, args.sms, args.only)
    print(f"triton {triton.__version__}: {len(launches)} specializations to compile for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} ({time.perf_counter() - t0:.1f} s to record)",
          flush=True)
    results = compile_all(launches, args.jobs, progress=lambda m: print(m, flush=True))
    print(summary_table(results))
    bad = problems(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, archs=args.arch,
                           quick=args.quick, sms=args.sms, results=results), f, indent=1)
    print(f"{len(results)} compiled in {time.perf_counter() - t0:.1f} s; "
          f"{len(bad)} problem(s)")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
