"""DPO step memory per mode under FSDP2 (fully_shard), 2 gloo ranks on the CPU.

The claim behind TeleBoost's decoupled backward under sharding: with one backward per branch,
the first branch's gradients are reduce-scattered (and their unsharded buffers freed) before the
second backward, which standard DPO's single backward over both branches cannot do. This measures
it: the benchmark model of ``dpo_memory.py`` (diffusers' WanTransformer3DModel when installed),
every transformer block and the root ``fully_shard``-ed, one DPO step per mode on each rank (its
own data), counted by ``tbkernels.memory.peak_tensor_memory`` (exact bytes of the tensors the
step creates; FSDP's all-gathered parameters and unsharded gradients included), as a first
micro-batch and as an accumulating one (``.grad`` already holding a step's sharded gradients).

    python benchmarks/dpo_memory_fsdp.py                      # wan-small, latent [1,16,5,16,24]
    python benchmarks/dpo_memory_fsdp.py --wide --layers 2    # Wan2.1-1.3B width, one 480p frame

Rows: op ``dpo_memory_fsdp`` in benchmarks/results/results.csv (``--no-record``: print only),
metric ``peak_tensor_bytes`` per rank (shape suffix ``|rank<r>``), ratios to standard.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_memory as dm  # noqa: E402
from results import Recorder, device_name, git_commit  # noqa: E402

import tbkernels  # noqa: E402

OP = "dpo_memory_fsdp"
WORLD = 2


def _rank(rank, init_file, spec, queue):
    import torch.distributed as dist
    try:
        from torch.distributed.fsdp import fully_shard
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD, timeout=datetime.timedelta(seconds=600))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
        out = {}
        for mode in dm.MODES:
            for accum in (False, True):
                device, model, kind, cfg, _, _ = dm.setup(dict(spec, mode=mode))
                for block in model.blocks:
                    fully_shard(block)
                fully_shard(model)
                batch = dm.make_batch(tuple(spec["latent"]), cfg, device, seed=rank)
                dm.dpo_step(model, batch, mode)                     # warm-up
                model.zero_grad(set_to_none=True)
                if accum:                                           # the first micro-batch
                    dm.dpo_step(model, batch, mode, zero_grad=False)
                with tbkernels.memory.peak_tensor_memory() as tm:
                    dm.dpo_step(model, batch, mode, zero_grad=False)
                out[f"{mode}|{int(accum)}"] = tm.peak_bytes
                print(f"  rank {rank}: {mode:<10} {'accumulating' if accum else 'first':<12} "
                      f"{tm.peak_bytes / 2**20:9.2f} MiB", flush=True)
        result = (rank, dict(peaks=out, model=kind))
    except BaseException:
        result = (rank, traceback.format_exc())
    # flush the result, then leave at once: gloo teardown was seen to hang a rank now and then
    # (tests/test_dpo.py, the DDP test), and every collective of this rank has completed
    queue.put(result)
    queue.close()
    queue.join_thread()
    os._exit(0 if not isinstance(result[1], str) else 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wide", action="store_true",
                   help="Wan2.1-1.3B width (dim 1536, FFN 8960) on one 480p latent frame")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if not torch.distributed.is_available():
        sys.exit("torch.distributed is not available in this torch build")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        sys.exit("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    config, latent = ("wan1.3b", "480p_1f") if args.wide else ("wan-small", "small")
    layers = args.layers or (2 if args.wide else dm.CONFIGS[config]["layers"])
    spec = dict(config=config, device="cpu", diffusers=args.diffusers and dm.diffusers_available(),
                layers=layers, latent=dm.LATENTS[latent], ft="full", ckpt=False, lora_rank=32)
    cpu = torch.device("cpu")
    command = "python benchmarks/dpo_memory_fsdp.py " + " ".join(sys.argv[1:])
    recorder = Recorder(enabled=not args.no_record, device=device_name(cpu),
                        commit=git_commit(), command=command.strip())
    shape = dm.shape_key(spec) + f"|fsdp2x{WORLD}"
    print(f"{OP}: {shape}, {WORLD} gloo ranks, commit {recorder.commit}", flush=True)

    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, os.path.join(tmp, "init"), spec, queue))
                 for r in range(WORLD)]
        for proc in procs:
            proc.start()
        results = dict(queue.get(timeout=3600) for _ in procs)
        for proc in procs:
            proc.join(timeout=120)
    failed = {r: res for r, res in results.items() if isinstance(res, str)}
    if failed:
        sys.exit("\n".join(f"rank {r} failed:\n{res}" for r, res in failed.items()))

    print(f"\n{'rank':<5} {'micro-batch':<13} {'mode':<10} {'peak tensors':>13} {'vs standard':>12}")
    for rank, res in sorted(results.items()):
        peaks = res["peaks"]
        for accum in (0, 1):
            std = peaks[f"standard|{accum}"]
            for mode in dm.MODES:
                b = peaks[f"{mode}|{accum}"]
                key = f"{shape}|rank{rank}" + ("|accum" if accum else "")
                recorder.add(OP, mode, key, "float32", "peak_tensor_bytes", b)
                if mode != "standard":
                    recorder.add(OP, mode, key, "float32", "peak_tensor_ratio_vs_standard",
                                 b / std)
                print(f"{rank:<5} {'accumulating' if accum else 'first':<13} {mode:<10} "
                      f"{b / 2**20:11.2f}M {b / std:12.3f}")
    print(f"\nmodel {results[0]['model']}; took {time.perf_counter() - t0:.0f} s")
    path = recorder.finish()
    if path:
        print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
