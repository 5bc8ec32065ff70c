"""Output rounding shared by the Triton kernels."""
import triton
import triton.language as tl


@triton.jit
def to_output(v, out_ty: tl.constexpr):
    """Round float32/float64 values to the output dtype, to nearest even.

    bfloat16 is rounded by hand (as PyTorch and the GPU do): the interpreter's float32 -> bfloat16
    cast truncates, so this keeps both machines bit-identical. NaN -> quiet NaN; +-inf and
    overflow round to +-inf.
    """
    if out_ty == tl.bfloat16:
        v32 = v.to(tl.float32)
        bits = tl.where(v32 != v32, 0x7FC00000, v32.to(tl.uint32, bitcast=True))
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(out_ty)
