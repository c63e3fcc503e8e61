"""Compile the fused 4-bit GEMM kernels (``lut_mma``: pointer loads and tensor descriptors) for sm_90 without a
GPU and report registers, spill stack, shared memory and SASS instruction counts (Triton's bundled ptxas and
nvdisasm).  The numbers depend on the Triton version: use the device's (3.6) for comparisons with GPU runs.

Run (repo root): ``PYTHONPATH=<site-packages holding triton 3.6>:. python benchmarks/gemm_sass.py [--bm 128 --bt 8]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from hf_optquant.kernels import lut_mma as LM  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_report(kernel, ptrs: dict, consts: dict, num_warps: int, stages: int) -> dict:
    fn = LM._JITFunction(kernel)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            if ptrs[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
    src = triton.compiler.ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as d:
        cub = os.path.join(d, "k.cubin")
        with open(cub, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", cub], capture_output=True, text=True).stdout
        res = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", cub], capture_output=True,
                             text=True).stdout  # fmt: skip
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", res).groups()
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, flags=re.M)
    count = {op: sum(o.split(".")[0] == op for o in ops) for op in ("LDG", "LDGSTS", "UTMALDG", "ISETP", "HGMMA")}
    return dict(regs=int(regs), stack=int(stack), shared=k.metadata.shared, instructions=len(ops), **count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bm", type=int, default=128)
    ap.add_argument("--bt", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--num-warps", type=int, default=4)
    args = ap.parse_args()
    consts = dict(SG=2, BT=args.bt, BM=args.bm, STAGES=args.stages, F16=False, ASM=True, SPLIT=False)
    common = dict(lut_ptr="*fp32", tb_ptr="*i32", s_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32")
    variants = {
        "pointer loads": (LM._mma_gemm_kernel, dict(x_ptr="*bf16", w_ptr="*i32", **common)),
        "tensor descriptors": (LM._mma_gemm_tma_kernel, dict(x_desc=f"tensordesc<bf16[{args.bm},64]>",
                                                             w_desc=f"tensordesc<i32[{args.bt},128]>", **common)),
    }  # fmt: skip
    print(f"Triton {triton.__version__}, sm_90, BM={args.bm} BT={args.bt} STAGES={args.stages} "
          f"num_warps={args.num_warps}")  # fmt: skip
    for label, (kernel, ptrs) in variants.items():
        print(label, compile_report(kernel, ptrs, consts, args.num_warps, args.stages))


if __name__ == "__main__":
    main()
