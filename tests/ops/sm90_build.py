"""Build every kdforge Triton kernel for an H100 (sm_90) on a machine without a GPU:
``python tests/ops/sm90_build.py [--quick]`` (--quick: one config per kernel, as the test suite runs it).

Triton lowers each kernel to PTX and runs ptxas (bundled with triton) for the target, so syntax, typing and
layout errors that the CPU interpreter cannot see (it runs the kernels as numpy code) surface here, and the
register / spill / shared-memory use of each config is printed. Runtime specialisation is imitated: unit strides
are compile-time constants and pointers / leading strides carry the 16-divisibility hint, as triton's launcher
sets them for contiguous inputs. Exit status 1 if any build fails. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def build(fn, sig, consts, *, ones=(), div16=(), num_warps=4, num_stages=3, name=""):
    signature = {k: v for k, v in sig.items() if k not in ones}
    constexprs = {}
    for k, v in list(consts.items()) + [(o, 1) for o in ones]:
        signature[k] = "constexpr"
        constexprs[(fn.arg_names.index(k),)] = v
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div16}
    attrs.update({(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*")})
    # ASTSource wants the arguments in declaration order.
    signature = {k: signature[k] for k in fn.arg_names if k in signature}
    try:
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
            target=TARGET,
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
    except Exception as exc:  # noqa: BLE001 - report every failing config, then fail at the end
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:4000]}")
        return False
    usage = ""
    if os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
        usage = f"regs={m.group(1)} spill_stack={m.group(2)}B" if m else ""
    print(f"OK   {name:60s} {usage} smem={kernel.metadata.shared}B")
    return True


def main(quick: bool) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the kernels must be JIT functions, not interpreted ones")
        return 2
    from kdforge.kernels import attention as A
    from kdforge.kernels import knn as K
    from kdforge.kernels import masked_rows as M
    from kdforge.kernels import whitened_loss as W

    ok = True
    # quick: one config per kernel and variant that matters (bf16/fp16 as trained), else the whole grid.
    floats = (("bf16", "tf32"),) if quick else (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee"))
    for dt, ds in ((d, d) for d, _ in floats):
        sig = {"S": f"*{dt}", "T": "*bf16", "IDX": "*i64", "DS": f"*{ds}", "ROW_LOSS": "*fp32", "n_rows": "i32",
               "D": "i32", "s_stride_r": "i32", "s_stride_d": "i32", "t_stride_r": "i32", "t_stride_d": "i32",
               "ds_stride_r": "i32", "grad_scale": "fp32", "beta": "fp32", "eps": "fp32"}  # fmt: skip
        for loss in (W.LOSS_SMOOTH_L1,) if quick else (W.LOSS_SMOOTH_L1, W.LOSS_MSE, W.LOSS_L1):
            for cfg in (dict(BLOCK_R=4, BLOCK_D=1024, nw=4),) + (() if quick else (dict(BLOCK_R=1, BLOCK_D=16384, nw=16),)):
                nw = cfg.pop("nw")
                ok &= build(W._whitened_loss_kernel, sig, dict(HAS_INDEX=True, WHITEN=True, LOSS=loss, NEED_GRAD=True, **cfg),
                            ones=("s_stride_d", "t_stride_d"), div16=("D", "s_stride_r", "t_stride_r", "ds_stride_r"),
                            num_warps=nw, name=f"whitened_loss {dt} loss={loss} {cfg} w{nw}")  # fmt: skip

    ok &= build(M._gather_rows_kernel, {"X": "*bf16", "IDX": "*i64", "OUT": "*bf16", "n_rows": "i32", "D": "i32",
                "x_stride_r": "i32", "x_stride_d": "i32"}, dict(BLOCK_R=8, BLOCK_D=1024), ones=("x_stride_d",),
                div16=("D", "x_stride_r"), name="masked gather bf16")  # fmt: skip
    for has_rows, has_out in ((True, True), (False, True), (True, False)):
        ok &= build(M._merge_rows_kernel, {"ROWS": "*bf16", "MASK": "*u8", "POS": "*i32", "OUT": "*bf16", "NEW": "*bf16",
                    "n_rows": "i32", "D": "i32", "rows_stride_r": "i32", "rows_stride_d": "i32", "out_stride_r": "i32",
                    "out_stride_d": "i32"}, dict(HAS_ROWS=has_rows, HAS_OUT=has_out, BLOCK_R=8, BLOCK_D=1024),
                    ones=("rows_stride_d", "out_stride_d"), name=f"masked merge rows={has_rows} out={has_out}")  # fmt: skip

    strides = lambda p, dims: {f"{p}{x}": "i32" for x in dims}  # noqa: E731
    for dt, prec in floats:
        fwd = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "BIAS": f"*{dt}", "O": f"*{dt}", "LSE": "*fp32",
               **strides("sq", "bhnd"), **strides("sk", "bhnd"), **strides("sv", "bhnd"), **strides("sb", "bhmn"),
               "H": "i32", "N": "i32", "D_HEAD": "i32", "qk_scale": "fp32"}  # fmt: skip
        unit = ("sqd", "skd", "svd", "sbn")
        lead = ("sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn", "D_HEAD")
        for d in (64,) if quick else (64, 128):
            for c in A._fwd_configs()[1:2] if quick else A._fwd_configs()[:2]:
                ok &= build(A._attn_fwd_kernel, fwd, dict(HAS_BIAS=True, DOT_PREC=prec, UPCAST=False, BLOCK_D=d, **c.kwargs),
                            ones=unit, div16=lead, num_warps=c.num_warps, num_stages=c.num_stages,
                            name=f"attention fwd {dt} d{d} {c.kwargs} w{c.num_warps}")  # fmt: skip
        bwd = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "BIAS": f"*{dt}", "DO": f"*{dt}", "LSE": "*fp32",
               "DELTA": "*fp32", "DK": f"*{dt}", "DV": f"*{dt}", "DBIAS": "*fp32", **strides("sq", "bhnd"),
               **strides("sk", "bhnd"), **strides("sv", "bhnd"), **strides("sb", "bhmn"), **strides("sdo", "bhnd"),
               **strides("sg", "bhmn"), "H": "i32", "N": "i32", "D_HEAD": "i32", "qk_scale": "fp32", "sm_scale": "fp32"}  # fmt: skip
        c = A._bwd_configs()[1]
        for atomic in (True,) if quick else (True, False):
            ok &= build(A._attn_bwd_dkdv_kernel, bwd, dict(HAS_BIAS=True, NEED_DBIAS=True, DBIAS_ATOMIC=atomic, DOT_PREC=prec,
                        UPCAST=False, BLOCK_D=64, **c.kwargs), ones=unit + ("sdod", "sgn"), div16=lead,
                        num_warps=c.num_warps, num_stages=c.num_stages, name=f"attention dkdv {dt} atomic={atomic} {c.kwargs}")  # fmt: skip
        dq = {k: v for k, v in bwd.items() if k not in ("DK", "DV", "DBIAS") and not k.startswith("sg")}
        dq = {k: ({"DQ": f"*{dt}"}.get(k) or dq.get(k)) for k in A._attn_bwd_dq_kernel.arg_names if k in dq or k == "DQ"}
        ok &= build(A._attn_bwd_dq_kernel, dq, dict(HAS_BIAS=True, DOT_PREC=prec, UPCAST=False, BLOCK_D=64, **c.kwargs),
                    ones=unit + ("sdod",), div16=lead, num_warps=c.num_warps, num_stages=c.num_stages,
                    name=f"attention dq {dt} {c.kwargs}")  # fmt: skip
        ok &= build(A._attn_bwd_delta_kernel, {"O": f"*{dt}", "DO": f"*{dt}", "DELTA": "*fp32", "sdob": "i32", "sdoh": "i32",
                    "sdon": "i32", "sdod": "i32", "H": "i32", "N": "i32", "D_HEAD": "i32"}, dict(BLOCK_M=64, BLOCK_D=64),
                    ones=("sdod",), name=f"attention delta {dt}")  # fmt: skip

    for dt, prec in (("fp16", "tf32"),) if quick else (("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "ieee")):
        sig = {"Qp": f"*{dt}", "G": f"*{dt}", "OUT": "*i64", "n_q": "i32", "n_g": "i32", "D": "i32", "sq_r": "i32",
               "sq_d": "i32", "sg_r": "i32", "sg_d": "i32", "so_r": "i32", "index_offset": "i64", "slice_len": "i32"}  # fmt: skip
        for bq, bg, fused in ((64, 128, True), (64, 128, False)) if quick else ((64, 128, True), (16, 256, True), (64, 128, False)):
            for l2 in (True,) if quick else (False, True):
                ok &= build(K._knn_kernel, sig, dict(METRIC_L2=l2, FUSED_TOPK=fused, DOT_PREC=prec, UPCAST=False, BLOCK_Q=bq,
                            BLOCK_G=bg, BLOCK_D=64), ones=("sq_d", "sg_d"), div16=("D", "sq_r", "sg_r"), num_warps=8,
                            name=f"knn {dt} BQ={bq} BG={bg} fused={fused} l2={l2}")  # fmt: skip
    print("all kernels built for sm_90" if ok else "some kernels failed to build for sm_90")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv[1:]))
