"""Compile each Triton kernel ahead of time for an NVIDIA target, no GPU needed; print one JSON
line per kernel with its register and stack (spill) use read back from the cubin.

Run as ``python tests/unit/_triton_aot.py [ARCH]`` with ``TRITON_INTERPRET`` unset (the
interpreter replaces the kernels); ``test_triton_compile.py`` does that in a subprocess. The
tiles are the ones the wrappers pick (``decode_tiles``, ``prefill_tiles``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.triton import activation, kv_store, rms_norm, rotary
from kernels.triton import paged_decode_attention as decode
from kernels.triton import paged_prefill_attention as prefill


def _resources(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out, re.S)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {}


def _compile(target: GPUTarget, name: str, fn, sig: dict, consts: dict, warps: int) -> dict:
    full = {**sig, **{k: "constexpr" for k in consts}}
    full = {k: full[k] for k in fn.arg_names}
    try:
        kernel = triton.compile(ASTSource(fn, full, consts), target=target, options={"num_warps": warps})
    except Exception as exc:  # reported, not raised: the test names every kernel that fails
        return {"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {"name": name, "ok": True, **_resources(kernel.asm["cubin"])}


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    dt = "*bf16"
    i32, i64 = "i32", "i64"
    jobs = [
        ("rms_norm_add", rms_norm._rms_norm_kernel,
         dict(x_ptr=dt, res_ptr=dt, w_ptr=dt, out_ptr=dt, inner=i32, stride_outer=i32, stride_inner=i32,
              stride_res=i32, n_cols=i32, eps="fp32"), dict(HAS_RES=True, UNIT_OFFSET=False, BLOCK=4096), 8),
        ("rotary", rotary._rotary_kernel,
         dict(x_ptr=dt, cos_ptr=dt, sin_ptr=dt, out_ptr=dt, n_heads=i32, half=i32, stride_xt=i32, stride_xh=i32,
              stride_ct=i32, stride_st=i32), dict(BLOCK_H=16, BLOCK_HALF=64), 4),
        ("gelu_tanh_and_mul", activation._act_and_mul_kernel,
         dict(x_ptr=dt, out_ptr=dt, inter=i32, stride_x=i32), dict(ACT=1, BLOCK=1024), 4),
        ("store_kv", kv_store._store_kv_kernel,
         dict(k_ptr=dt, v_ptr=dt, cache_ptr=dt, slots_ptr="*i64", stride_kt=i32, stride_kh=i32, stride_vt=i32,
              stride_vh=i32, stride_c_kv=i64, stride_c_h=i64, stride_c_slot=i32), dict(HEAD_DIM=128, BLOCK_D=128), 1),
    ]
    for d in (64, 128):
        block_n, warps = decode.decode_tiles(d)
        jobs.append((f"paged_decode_d{d}", decode._paged_decode_kernel,
                     dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, out_ptr=dt, pages_ptr="*i64", k_len_ptr="*i64",
                          rows_ptr="*i64", stride_qt=i32, stride_qh=i32, stride_ot=i32, stride_oh=i32,
                          stride_kh=i64, stride_kp=i32, stride_ks=i32, stride_pt=i32, page_size=i32, scale="fp32",
                          soft_cap="fp32", window=i32),
                     dict(GROUP=4, HEAD_DIM=d, BLOCK_G=16, BLOCK_D=d, BLOCK_N=block_n, HAS_ROWS=True,
                          USE_WINDOW=True, USE_SOFT_CAP=True, DOT_PRECISION="tf32"), warps))
        block_m, block_n, warps = prefill.prefill_tiles(d, 512)
        jobs.append((f"paged_prefill_d{d}", prefill._paged_prefill_kernel,
                     dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, out_ptr=dt, pages_ptr="*i64", k_len_ptr="*i64",
                          token_index_ptr="*i64", valid_ptr="*i8", q_pos_ptr="*i64", stride_qt=i32, stride_qh=i32,
                          stride_ot=i32, stride_oh=i32, stride_kh=i64, stride_kp=i32, stride_ks=i32, stride_pt=i32,
                          stride_qb=i32, q_max=i32, page_size=i32, scale="fp32", soft_cap="fp32", window=i32),
                     dict(GROUP=4, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_D=d, BLOCK_N=block_n, USE_WINDOW=True,
                          USE_SOFT_CAP=True, DOT_PRECISION="tf32"), warps))
    for name, fn, sig, consts, warps in jobs:
        print(json.dumps(_compile(target, name, fn, sig, consts, warps)), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
