"""Triton implicit-GEMM convolutions whose input loader applies BatchNorm + ReLU/PReLU on the fly, and their
launchers (no autograd here).

Pre-activation convolution (He et al. 2016): out = conv2d(act(x * scale + shift), W) with per-channel
scale = gamma * invstd and shift = beta - mean * scale. As a GEMM over the channels-last input:

    M = N * OH * OW output pixels,  K = KH * KW * Cin,  A[m, k] = act(x[n, oh*s - p + kh, ow*s - p + kw, ci] * scale[ci]
                                                                    + shift[ci]),  0 where the tap falls in the padding
    forward        out[m, co] = sum_k A[m, k] * Wt[k, co]           (Wt = W permuted to (KH, KW, Cin, Cout))
    weight grad    dWt[k, co] = sum_m A[m, k] * dout[m, co]

A is built tile by tile in registers and never stored: the padded taps are zero after the activation (the
convolution pads its input, which is the activation's output). Scope: channels-last fp16/bf16/fp32 inputs,
square 1x1 and 3x3 kernels, stride 1 or 2, padding 0 or 1, no dilation, one group; everything else runs the
framework's convolution on a materialised activation (fusedrect/ops/preact_conv.py). fp32 inputs run in TF32,
as cuDNN runs them by default; where cuDNN's convolutions may not (torch.backends.cudnn.allow_tf32 = False, or
torch.backends.cudnn.conv.fp32_precision = "ieee") they go to cuDNN instead.

The weight gradient reduces over all M pixels: programs take fixed shares of M (a split that depends on the
shape only), write fp32 partials, and the partials are summed in a fixed order: bitwise reproducible.
"""
import torch
import triton
import triton.language as tl

from fusedrect.kernels.bn_act import INTERPRET, PRELU, RELU, _activate, _on_device

SUPPORTED = {"kernel": (1, 3), "stride": (1, 2), "padding": (0, 1), "dtypes": (torch.float16, torch.bfloat16,
                                                                               torch.float32)}

# Autotuned over the output tile, warps and stages only: the tile of the summed dimension (BLOCK_K forward,
# BLOCK_M for the weight gradient) is the same in every config, so the choice never changes a result's bits.
# One list per element size ("16": fp16/bf16, "32": fp32), each config free of register spills on sm_80/sm_90.
FWD_BLOCK_K = 32
WGRAD_BLOCK_M = 64


def _configs(names, tiles, fixed):
    return [triton.Config({**dict(zip(names, tile)), **fixed}, num_warps=w, num_stages=s) for *tile, w, s in tiles]


FWD_CONFIGS = {
    "16": _configs(("BLOCK_M", "BLOCK_N"), [(128, 64, 8, 3), (64, 64, 4, 4), (64, 128, 8, 3)],
                   {"BLOCK_K": FWD_BLOCK_K}),
    "32": _configs(("BLOCK_M", "BLOCK_N"), [(64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2)],
                   {"BLOCK_K": FWD_BLOCK_K}),
}
WGRAD_CONFIGS = {  # the output tile of the weight gradient is (BLOCK_K, BLOCK_N)
    "16": _configs(("BLOCK_K", "BLOCK_N"), [(64, 64, 8, 3), (32, 64, 8, 3)], {"BLOCK_M": WGRAD_BLOCK_M}),
    "32": _configs(("BLOCK_K", "BLOCK_N"), [(64, 64, 8, 2), (32, 64, 8, 2)], {"BLOCK_M": WGRAD_BLOCK_M}),
}
WGRAD_TARGET_PROGRAMS = 512  # the split of M aims for this many programs (then partial sums in fixed order)
WGRAD_MAX_SPLIT = 64


def _tf32_convolutions():
    """Whether cuDNN may run fp32 convolutions in TF32: torch's per-operator setting
    (``torch.backends.cudnn.conv.fp32_precision``, torch >= 2.9) where it decides, else the legacy flag (which torch
    refuses to read once the two APIs were mixed)."""
    precision = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", "none")
    return precision == "tf32" if precision != "none" else torch.backends.cudnn.allow_tf32


def applies(x, conv_weight, stride, padding, dilation, groups):
    """True when the Triton convolution covers this call (else the framework's convolution runs)."""
    kh, kw = conv_weight.shape[-2:]
    tf32_allowed = x.dtype != torch.float32 or _tf32_convolutions()
    return (
        x.dim() == 4 and x.dtype in SUPPORTED["dtypes"] and conv_weight.dtype == x.dtype and tf32_allowed
        and x.is_contiguous(memory_format=torch.channels_last) and groups == 1 and tuple(dilation) == (1, 1)
        and kh == kw and kh in SUPPORTED["kernel"]
        and stride[0] == stride[1] and stride[0] in SUPPORTED["stride"]
        and padding[0] == padding[1] and padding[0] in SUPPORTED["padding"]
        and x.shape[2] + 2 * padding[0] >= kh and x.shape[3] + 2 * padding[1] >= kw
    )


@triton.jit
def _pixel_rows(rm, M, OH, OW, sN, sH, sW, STRIDE: tl.constexpr, PAD: tl.constexpr, INDEX_64: tl.constexpr):
    """For the flat output-pixel indices rm: the offset of input tap (0, 0) (which may lie in the padding) and
    its (ih, iw); rows past M get an ih no tap can bring inside the image."""
    ohw = OH * OW
    n = rm // ohw
    rest = rm - n * ohw
    oh = rest // OW
    ih = oh * STRIDE - PAD
    iw = (rest - oh * OW) * STRIDE - PAD
    if INDEX_64:
        base = n.to(tl.int64) * sN + ih.to(tl.int64) * sH + iw.to(tl.int64) * sW
    else:
        base = n * sN + ih * sH + iw * sW
    return base, tl.where(rm < M, ih, -(1 << 30)), iw


@triton.jit
def _preact_tile(x_ptr, scale_ptr, shift_ptr, slope_ptr, slope_stride, base, ih0, iw0, ci, kh, kw, H, W, Cin,
                 sH, sW, ACT: tl.constexpr):
    """A[m, k] for the tile's pixels (rows from _pixel_rows) and the input channels ci of tap (kh, kw), fp32."""
    ih = ih0 + kh
    iw = iw0 + kw
    row_ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    c_ok = ci < Cin
    inside = row_ok[:, None] & c_ok[None, :]
    row = base + (kh * sH + kw * sW)
    x = tl.load(x_ptr + row[:, None] + ci[None, :], mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + ci, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + ci, mask=c_ok, other=0.0)
    a = 0.0
    if ACT == PRELU:
        a = tl.load(slope_ptr + ci * slope_stride, mask=c_ok, other=0.0)[None, :]
    z = x * scale[None, :] + shift[None, :]
    return tl.where(inside, _activate(z, a, ACT), 0.0)  # padding is zero after the activation


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, shift_ptr, slope_ptr, slope_stride, bias_ptr,
                N, H, W, Cin, OH, OW, Cout, sN, sH, sW, M_CLASS,
                KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
                HAS_BIAS: tl.constexpr, INDEX_64: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, Cout) row-major = A (M, K) @ Wt (K, Cout); programs walk output tiles column-block-major so that
    neighbouring programs share input rows in L2."""
    M = N * OH * OW
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % blocks_m
    pid_n = pid // blocks_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < Cout
    base, ih0, iw0 = _pixel_rows(rm, M, OH, OW, sN, sH, sW, STRIDE, PAD, INDEX_64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    blocks_c = tl.cdiv(Cin, BLOCK_K)
    for step in range(0, KSIZE * KSIZE * blocks_c):  # one flat loop over (tap, channel block): pipelines well
        tap = step // blocks_c
        ci = (step - tap * blocks_c) * BLOCK_K + tl.arange(0, BLOCK_K)
        a = _preact_tile(x_ptr, scale_ptr, shift_ptr, slope_ptr, slope_stride, base, ih0, iw0, ci, tap // KSIZE,
                         tap % KSIZE, H, W, Cin, sH, sW, ACT)
        k = tap * Cin + ci
        w = tl.load(w_ptr + k[:, None] * Cout + rn[None, :], mask=(ci < Cin)[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision="tf32")  # tf32: for fp32 only
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if INDEX_64:
        out_offsets = rm.to(tl.int64)[:, None] * Cout + rn[None, :]
    else:
        out_offsets = rm[:, None] * Cout + rn[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _wgrad_kernel(x_ptr, dout_ptr, part_ptr, scale_ptr, shift_ptr, slope_ptr, slope_stride,
                  N, H, W, Cin, OH, OW, Cout, sN, sH, sW, M_PER_SPLIT, M_CLASS,
                  KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
                  INDEX_64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """partials[split, k, co] = sum over this split's pixels m of A[m, k] * dout[m, co]; grid
    (taps * Cin blocks, Cout blocks, splits)."""
    M = N * OH * OW
    blocks_c = tl.cdiv(Cin, BLOCK_K)
    tap = tl.program_id(0) // blocks_c
    ci = (tl.program_id(0) % blocks_c) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    n_ok = rn < Cout
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    start = split * M_PER_SPLIT
    for m0 in range(start, tl.minimum(start + M_PER_SPLIT, M), BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        base, ih0, iw0 = _pixel_rows(rm, M, OH, OW, sN, sH, sW, STRIDE, PAD, INDEX_64)
        a = _preact_tile(x_ptr, scale_ptr, shift_ptr, slope_ptr, slope_stride, base, ih0, iw0, ci, tap // KSIZE,
                         tap % KSIZE, H, W, Cin, sH, sW, ACT)
        if INDEX_64:
            d_offsets = rm.to(tl.int64)[:, None] * Cout + rn[None, :]
        else:
            d_offsets = rm[:, None] * Cout + rn[None, :]
        d = tl.load(dout_ptr + d_offsets, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a.to(d.dtype)), d, acc, input_precision="tf32")
    K = KSIZE * KSIZE * Cin
    k = tap * Cin + ci
    part_offsets = split.to(tl.int64) * K * Cout + k[:, None] * Cout + rn[None, :]
    tl.store(part_ptr + part_offsets, acc, mask=(ci < Cin)[:, None] & n_ok[None, :])


_KEY = ["Cin", "Cout", "KSIZE", "STRIDE", "M_CLASS"]
_fwd_tuned = {bits: triton.autotune(configs, key=_KEY)(_fwd_kernel) for bits, configs in FWD_CONFIGS.items()}
_wgrad_tuned = {bits: triton.autotune(configs, key=_KEY)(_wgrad_kernel) for bits, configs in WGRAD_CONFIGS.items()}


def _bits(x):
    return "32" if x.dtype == torch.float32 else "16"


def _folded(x, mean, invstd, weight, bias, slope):
    """fp32 (scale, shift, slope, slope_stride, ACT) of the prologue act(x * scale + shift)."""
    scale = invstd.float() if weight is None else weight.float() * invstd.float()
    shift = -mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    if slope is None:
        return scale.contiguous(), shift.contiguous(), scale, 0, RELU.value
    return scale.contiguous(), shift.contiguous(), slope.float().contiguous(), int(slope.numel() != 1), PRELU.value


def _geometry(x, conv_weight, stride, padding):
    N, Cin, H, W = x.shape
    ksize = conv_weight.shape[-1]
    OH = (H + 2 * padding[0] - ksize) // stride[0] + 1
    OW = (W + 2 * padding[1] - ksize) // stride[1] + 1
    sN, _, sH, sW = x.stride()
    return dict(N=N, H=H, W=W, Cin=Cin, OH=OH, OW=OW, Cout=conv_weight.shape[0], sN=sN, sH=sH, sW=sW), \
        dict(KSIZE=ksize, STRIDE=stride[0], PAD=padding[0])


def _index_64(*tensors):
    return any(t.numel() >= 2**31 for t in tensors)


def _launch(kernel, tuned, configs, grid, args, flags):
    """Autotuned on a GPU; the interpreter (which cannot autotune) runs the list's smallest tile.
    ``grid(meta)`` gives the launch grid for a config's block sizes."""
    if INTERPRET:
        config = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]).kwargs
        kernel[grid(config)](*args, **flags, **config)
    else:
        tuned[grid](*args, **flags)


@_on_device
def conv_fwd(x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding):
    """conv2d(act(BN(x)), conv_weight, conv_bias) for a call where applies(); output channels-last."""
    sizes, shape = _geometry(x, conv_weight, stride, padding)
    out = torch.empty((sizes["N"], sizes["Cout"], sizes["OH"], sizes["OW"]), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    M = sizes["N"] * sizes["OH"] * sizes["OW"]
    if out.numel() == 0:
        return out
    wt = conv_weight.permute(2, 3, 1, 0).contiguous()  # (KH, KW, Cin, Cout): row k = (kh, kw, ci)
    scale, shift, slope_t, slope_stride, act = _folded(x, mean, invstd, weight, bias, slope)
    args = (x, wt, out, scale, shift, slope_t, slope_stride, conv_bias if conv_bias is not None else scale,
            *sizes.values(), triton.next_power_of_2(M))
    flags = dict(**shape, ACT=act, HAS_BIAS=conv_bias is not None, INDEX_64=_index_64(x, out))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(sizes["Cout"], meta["BLOCK_N"]),)

    _launch(_fwd_kernel, _fwd_tuned[_bits(x)], FWD_CONFIGS[_bits(x)], grid, args, flags)
    return out


def _wgrad_split(M, blocks_k, blocks_n, block_m):
    """Shares of M for the weight-gradient programs: a function of the shape only (fixed summation order)."""
    steps = triton.cdiv(M, block_m)
    split = max(1, min(WGRAD_MAX_SPLIT, steps, WGRAD_TARGET_PROGRAMS // max(1, blocks_k * blocks_n)))
    per_split = max(1, triton.cdiv(steps, split)) * block_m
    return max(1, triton.cdiv(M, per_split)), per_split  # an empty batch: one split, left zero


@_on_device
def conv_wgrad(grad_out, x, mean, invstd, weight, bias, slope, conv_weight, stride, padding):
    """The gradient of conv_weight (its shape, dtype and memory format) for a call where applies()."""
    sizes, shape = _geometry(x, conv_weight, stride, padding)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    ksize, Cin, Cout = shape["KSIZE"], sizes["Cin"], sizes["Cout"]
    M = sizes["N"] * sizes["OH"] * sizes["OW"]
    scale, shift, slope_t, slope_stride, act = _folded(x, mean, invstd, weight, bias, slope)
    splits, per_split = _wgrad_split(M, ksize * ksize * triton.cdiv(Cin, 64), triton.cdiv(Cout, 64), WGRAD_BLOCK_M)
    # Every program writes its whole tile of its split's partials; zeros remain only for an empty batch.
    partials = torch.zeros((splits, ksize * ksize * Cin, Cout), dtype=torch.float32, device=x.device)
    if M:
        args = (x, grad_out, partials, scale, shift, slope_t, slope_stride, *sizes.values(), per_split,
                triton.next_power_of_2(M))
        flags = dict(**shape, ACT=act, INDEX_64=_index_64(x, grad_out))

        def grid(meta):
            return (ksize * ksize * triton.cdiv(Cin, meta["BLOCK_K"]), triton.cdiv(Cout, meta["BLOCK_N"]), splits)

        _launch(_wgrad_kernel, _wgrad_tuned[_bits(x)], WGRAD_CONFIGS[_bits(x)], grid, args, flags)
    grad_t = partials.sum(0) if splits > 1 else partials[0]  # fixed-order sum over the splits
    grad = grad_t.reshape(ksize, ksize, Cin, Cout).permute(3, 2, 0, 1)
    return torch.empty_like(conv_weight).copy_(grad)
