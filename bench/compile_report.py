"""Compile every Triton kernel of dp_attn for A100 (sm_80) and H100/H200 (sm_90a), no GPU needed.

Each kernel is reached through its real host launcher (the functions of dp_attn/kernels/*.py
that call `kernel[grid](...)`), called with small CPU tensors while TRITON_INTERPRET is off.
The launch is intercepted before anything touches a driver: for an autotuned kernel every
config the autotuner may pick for that call (its configs after its own pruning), otherwise
the launch itself. Each captured launch is then specialised by Triton's own JIT code (the
binder `create_function_from_signature` builds for the CUDA backend, and
`JITFunction._pack_args`), with every tensor placed at a 512-byte-aligned GPU-like address
plus its storage offset, as the CUDA caching allocator would place it: so pointers and ints
divisible by 16 get `tt.divisibility`, ints equal to 1 become constants, exactly as on a GPU.
It is compiled by `triton.compile` for the target, and ptxas' own log of that compile gives
registers and spill bytes; shared memory is the compiled kernel's `metadata.shared`.

    python bench/compile_report.py                 # the representative subset (CI)
    python bench/compile_report.py --full --json report.json --markdown report.md

A row fails (`ok` false) on a compile error, on shared memory over the arch's per-block
limit, or on spills in a 16-bit (fp16/bf16) config; fp32 spills are reported, not failed.
The exit status is 1 when any row fails.
"""

from __future__ import annotations

import os

# The launchers must see a compiled-Triton world: every autotune config, no interpreter casts.
os.environ["TRITON_INTERPRET"] = "0"
# Triton 3.9 warns that its FP-fusion default will change; fusion on is what 3.6 (the GPU
# machines' Triton) and 3.9 do.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import multiprocessing
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from dp_attn.kernels import (
    clipped_sum,
    embedding,
    flash_attn,
    noise,
    norm_affine,
    per_example_norms,
)

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
ARCHS = {"sm_80": (80, 166_912), "sm_90a": (90, 232_448)}
SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Where the CUDA caching allocator's blocks start: 512-byte aligned.
GPU_BASE_ADDRESS = 0x7F00_0000_0000


@dataclasses.dataclass
class Launch:
    """One kernel launch as the JIT would compile it: the function, its bound arguments and
    keyword arguments (constexprs and compile options, autotune config included)."""

    fn: JITFunction
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Case:
    """A launcher call: `call(dtype, full)` runs it on CPU tensors of that dtype (`full`: every
    variant, else the CI subset's)."""

    shape: str
    dtypes: tuple[torch.dtype, ...]
    call: Callable[[torch.dtype, bool], object]
    in_subset: bool = False


class GpuAddressTensor:
    """What Triton's specialisation reads of a tensor (dtype, data_ptr), on a GPU-like address
    with the tensor's own offset into its storage."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        offset = tensor.data_ptr() - tensor.untyped_storage().data_ptr()
        self._address = GPU_BASE_ADDRESS + offset

    def data_ptr(self) -> int:
        return self._address


@contextlib.contextmanager
def captured_launches() -> Iterator[list[Launch]]:
    """Record launches instead of running them: each config of an autotuned kernel (after its
    early pruning) as one launch, and each plain launch."""
    launches: list[Launch] = []

    def autotuner_run(self, *args, grid, warmup, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        for config in self.prune_configs(kwargs):
            launches.append(Launch(self.fn, args, {**kwargs, **config.all_kwargs()}))
        self.nargs = None

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    with (
        mock.patch.object(Autotuner, "run", autotuner_run),
        mock.patch.object(JITFunction, "run", jit_run),
    ):
        yield launches


def on_gpu(value):
    return GpuAddressTensor(value) if isinstance(value, torch.Tensor) else value


def specialise(launch: Launch, backend):
    """(signature, constexprs, attrs, options) of the launch, by the JIT's own code."""
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [on_gpu(a) for a in launch.args]
    kwargs = {k: on_gpu(v) for k, v in launch.kwargs.items()}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return signature, constexprs, attrs, options


def kernel_name(fn: JITFunction) -> str:
    """The kernel's name prefixed by its family (attn, norm, clip, embed, noise)."""
    name = fn.__name__.strip("_").removesuffix("_kernel")
    if fn.__module__ == flash_attn.__name__:
        family = "attn"
    elif "embedding" in name:
        family = "embed"
    elif "noise" in name:
        family = "noise"
    elif "clipped" in name:
        family = "clip"
    elif "norm" in name:
        family = "norm"
    else:
        raise ValueError(f"kernel {fn.__name__} has no family; add it to kernel_name")
    return name if name == family or name.startswith(f"{family}_") else f"{family}_{name}"


def config_text(fn: JITFunction, constexprs: dict, options) -> str:
    names = {(i,): name for i, name in enumerate(fn.arg_names)}
    blocks = " ".join(
        f"{names[path]}={value}"
        for path, value in constexprs.items()
        if names.get(path, "").startswith("BLOCK_")
    )
    return f"{blocks} w{options.num_warps} s{options.num_stages}".strip()


def ptxas_usage(log: str) -> tuple[int | None, int]:
    """(registers, spill-store bytes) from ptxas -v's log of one compile."""
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    return (max(registers) if registers else None), sum(spills)


def compile_launch(launch: Launch, arch: str) -> tuple[dict, tuple, tuple]:
    """What compiling one launch for `arch` needs: (row fields, dedup key, compile job)."""
    capability, _ = ARCHS[arch]
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = specialise(launch, backend)
    fields = {
        "kernel": kernel_name(launch.fn),
        "config": config_text(launch.fn, constexprs, options),
    }
    key = (launch.fn, arch, repr(signature), repr(constexprs), repr(attrs), repr(options))
    return fields, key, (ASTSource(launch.fn, signature, constexprs, attrs), target, options)


def run_compile(src, target, options) -> dict:
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as error:  # every compile failure becomes a failed row, not a crash
        message = f"{type(error).__name__}: {error}".splitlines()
        return {
            "registers": None,
            "spill_bytes": None,
            "smem_bytes": None,
            "error": message[0][:300] if message else type(error).__name__,
        }
    registers, spills = ptxas_usage(log.getvalue())
    return {
        "registers": registers,
        "spill_bytes": spills,
        "smem_bytes": compiled.metadata.shared,
        "error": None,
    }


def judge(row: dict, dtype: torch.dtype, smem_limit: int) -> dict:
    if row["error"] is None:
        if row["smem_bytes"] > smem_limit:
            row["error"] = f"shared memory {row['smem_bytes']} B over the limit {smem_limit} B"
        elif row["spill_bytes"] and dtype in SIXTEEN_BIT:
            row["error"] = f"{row['spill_bytes']} B of register spills in a 16-bit config"
    row["ok"] = row["error"] is None
    return row


# ---------------------------------------------------------------- the launcher calls


def _attention(head_dim: int, causal: bool, gqa: bool):
    """Forward and backward launchers of one attention shape: MHA without masks, or GQA
    (2 query heads per kv head) with causal masking and per-example key lengths."""

    def call(dtype, full):
        B, H, Hkv, T = 2, 4, 2 if gqa else 4, 256
        q = torch.zeros(B, T, H, head_dim, dtype=dtype).transpose(1, 2)
        k = torch.zeros(B, T, Hkv, head_dim, dtype=dtype).transpose(1, 2)
        v = torch.zeros_like(k)
        lengths = torch.full((B,), T, dtype=torch.int64) if gqa else None
        out, lse = flash_attn.flash_attention_fwd(q, k, v, causal, head_dim**-0.5, lengths)
        flash_attn.flash_attention_bwd(out, q, k, v, out, lse, causal, head_dim**-0.5, lengths)

    return call


def _linear(T: int, din: int, dout: int, method: str):
    """Per-example norms (one path), the clipped sum and the block-clipped sum (one program
    per tile, and split over programs as on a GPU with more SMs than tiles): as the engine
    calls them (fp32 sums; it noises the summed gradients once per step, by
    add_gaussian_noise_), and in the input dtype, the functional API's default."""

    def call(dtype, full):
        a, g = torch.zeros(2, T, din, dtype=dtype), torch.zeros(2, T, dout, dtype=dtype)
        c = torch.ones(2)
        per_example_norms.per_example_grad_sq_norms(a, g, bias=True, method=method)
        for options in ({"out_dtype": torch.float32}, {}):
            clipped_sum.clipped_grad_sum(a, g, c, **options)
            clipped_sum.block_clipped_grad_sum(a, g, 1.0, **options)
            with mock.patch.object(clipped_sum, "block_clip_splits", lambda *_: 2):
                clipped_sum.block_clipped_grad_sum(a, g, 1.0, **options)

    return call


def _small_layers(T: int, d: int, vocab: int):
    def call(dtype, full):
        x, g = torch.zeros(2, T, d, dtype=dtype), torch.zeros(2, T, d, dtype=dtype)
        ids, c = torch.zeros(2, T, dtype=torch.int64), torch.ones(2)
        norm_affine.norm_affine_grad_sq_norms(x, g, bias=True)
        norm_affine.norm_affine_clipped_grad_sum(x, g, c)
        embedding.embedding_clipped_grad_sum(ids, g, c, vocab, padding_idx=0)

    return call


def _noise(rows: int, width: int):
    def call(dtype, full):
        for secure in (False, True):
            noise.add_gaussian_noise_(
                torch.zeros(rows, width, dtype=dtype), 1.0, seed=0, secure_mode=secure
            )

    return call


def cases() -> list[Case]:
    every = (torch.float16, torch.bfloat16, torch.float32)
    found = []
    # Every block width the candidate tables cover, and a head dim padded to the next one.
    for head_dim in [*sorted(flash_attn._FWD_CANDIDATES), 80]:
        for causal, gqa, label in ((False, False, "MHA"), (True, True, "GQA causal lengths")):
            found.append(
                Case(
                    f"D={head_dim} {label}",
                    every,
                    _attention(head_dim, causal, gqa),
                    in_subset=head_dim == 128 and gqa,
                )
            )
    layers = [
        ("GPT-2 MLP T=1024 768x3072", 1024, 768, 3072, True),
        ("narrow T=48 40x24", 48, 40, 24, False),
    ]
    for label, T, din, dout, subset in layers:
        for method in ("ghost", "instantiate"):
            found.append(
                Case(
                    f"{label} {method}",
                    every,
                    _linear(T, din, dout, method),
                    in_subset=subset and method == "instantiate",
                )
            )
    found.append(
        Case("T=1024 d=768 vocab=50257", every, _small_layers(1024, 768, 50257), in_subset=True)
    )
    found.append(Case("T=48 d=40 vocab=1000", every, _small_layers(48, 40, 1000)))
    found.append(Case("768x3072", every, _noise(768, 3072), in_subset=True))
    found.append(Case("1x50", every, _noise(1, 50)))
    return found


# The compile jobs of report(): forked workers read them by index (kernels do not pickle).
_JOBS: list[tuple] = []


def timed_compile(index: int) -> tuple[dict, float]:
    start = time.perf_counter()
    result = run_compile(*_JOBS[index])
    return result, time.perf_counter() - start


def report(
    full: bool,
    archs: list[str],
    dtypes: list[torch.dtype] | None = None,
    progress=None,
    jobs: int = 1,
) -> list[dict]:
    """Compile every captured launch of the chosen cases; one row per distinct compile, `jobs`
    compiles at a time (in forked processes: ptxas and Triton's passes are CPU-bound)."""
    triton.knobs.compilation.always_compile = True  # ptxas must run (and log) every time
    triton.knobs.nvidia.dump_ptxas_log = True
    pending, seen = [], set()  # (row fields, dtype, compile job)
    for case in cases():
        if not (full or case.in_subset):
            continue
        for dtype in case.dtypes:
            if dtypes is not None and dtype not in dtypes:
                continue
            if not full and dtype != torch.bfloat16:
                continue  # fp16 takes bf16's configs; fp32 spills are reported, not failed
            with captured_launches() as launches:
                case.call(dtype, full)
            for arch in archs:
                for launch in launches:
                    fields, key, job = compile_launch(launch, arch)
                    if key not in seen:
                        seen.add(key)
                        fields = {
                            **fields,
                            "arch": arch,
                            "dtype": str(dtype).removeprefix("torch."),
                            "shape": case.shape,
                        }
                        pending.append((fields, dtype, job))
    _JOBS[:] = [job for _, _, job in pending]
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(jobs))
            results = pool.imap(timed_compile, range(len(pending)))
        else:
            results = map(timed_compile, range(len(pending)))
        rows = []
        for (fields, dtype, _), (result, seconds) in zip(pending, results, strict=True):
            row = judge({**fields, **result}, dtype, ARCHS[fields["arch"]][1])
            rows.append(row)
            if progress:
                progress(row, seconds)
    return rows


def versions() -> dict:
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


COLUMNS = (
    "kernel",
    "arch",
    "dtype",
    "shape",
    "config",
    "registers",
    "spill_bytes",
    "smem_bytes",
    "ok",
    "error",
)


def markdown(rows: list[dict], meta: dict) -> str:
    failed = sum(not r["ok"] for r in rows)
    lines = [
        f"# Compile report: triton {meta['triton']}, torch {meta['torch']}, {meta['date']}",
        "",
        "Written by `bench/compile_report.py` on a machine without a GPU: the kernels of dp_attn",
        "compiled by Triton and ptxas for each arch, with the JIT's specialisation of the real",
        "launchers' arguments. Registers and spill-store bytes are ptxas' (-v); shared memory is",
        "what Triton allocates per block. `ok` fails on a compile error, on shared memory over",
        "the arch's per-block limit (sm_80 166,912 B, sm_90a 232,448 B) and on spills in fp16 or",
        "bf16. fp32 (tests and debugging) spills are reported, not failed.",
        "",
        f"{len(rows)} compiles, {failed} failing.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        cells = ["" if r[c] is None else str(r[c]).replace("|", "/") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--full",
        action="store_true",
        help="every case, head dim and dtype (default: the CI subset)",
    )
    parser.add_argument(
        "--arch", choices=ARCHS, action="append", help="only this arch (repeatable; default: all)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="compiles at a time (default: the CPU count)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    args = parser.parse_args(argv)

    def progress(row, seconds):
        regs = "-" if row["registers"] is None else row["registers"]
        status = "ok" if row["ok"] else f"FAIL {row['error']}"
        print(
            f"{row['kernel']:<28} {row['arch']:<6} {row['dtype']:<8} {row['shape']:<28} "
            f"{row['config']:<34} regs {regs:>3} spill {row['spill_bytes']} "
            f"smem {row['smem_bytes']} {seconds:5.1f}s {status}",
            flush=True,
        )

    meta = versions()
    print(f"triton {meta['triton']}, torch {meta['torch']}", flush=True)
    rows = report(args.full, args.arch or list(ARCHS), progress=progress, jobs=args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**row, **meta} for row in rows], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, meta))
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows)} compiles, {len(failed)} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
