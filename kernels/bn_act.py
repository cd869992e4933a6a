"""Triton kernels for fused BatchNorm + ReLU/PReLU, and thin launchers that return tensors (no autograd here).

The launchers have the signatures of the ``torch.ops.fusedrect`` ops (csrc/fusedrect.cpp), which they implement
for CUDA tensors; under ``TRITON_INTERPRET=1`` they run on CPU tensors too. The math, per channel c over its M
elements (see shared/DESIGN.md):

    forward   z = (x - mean) * invstd * gamma + beta,   y = z > 0 ? z : a * z   (ReLU: z <= 0 ? 0 : z)
    backward  dz = dy * (z > 0 ? 1 : a),  dbeta = sum dz,  dgamma = invstd * sum dz * (x - mean),
              da = sum dy * min(z, 0),    dx = gamma * invstd * (dz - dbeta / M - xhat * dgamma / M)
              (with running statistics: dx = gamma * invstd * dz)
SyncBN runs the same kernels in halves: bn_stats (mean, var), bn_act_bwd_reduce (dbeta, dgamma, da) and
bn_act_bwd_elemt (dx with M and the sums taken over every rank).

The input (N, C, *spatial) is viewed as (N, C, S). Reductions use a tiling per layout:
    NCHW           grid (C, G): program (c, g) walks a contiguous share of channel c's M elements;
    channels-last  grid (G, C / BLOCK_C): program (g, b) walks rows of the (N*S, C) matrix, channels contiguous.
Each program writes its partials to (G, C) buffers (Chan's mean/M2 for the statistics, plain sums for
backward) and a second kernel merges them over g in a fixed order (tiles of partials, each a fixed tree): no
atomics, bitwise reproducible. The
reduction split depends only on the shape and is never autotuned (that would change the summation order);
the elementwise kernels are autotuned, keyed on the shape class, and use a heuristic config where autotuning
cannot run (the interpreter) or is switched off (FUSEDRECT_TRITON_AUTOTUNE=0: no compile-and-time pass over
the 9 configs at the first call of each shape class).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from fusedrect.reference import stats_dtype

RELU = tl.constexpr(0)  # values of the ACT constexpr
PRELU = tl.constexpr(1)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Reductions: elements (NCHW) or rows x channels (channels-last) per loop step, and the programs to aim for.
REDUCE_BLOCK = 1024
REDUCE_BLOCK_R, REDUCE_BLOCK_C = 32, 64
TARGET_PROGRAMS = 1024
REDUCE_WARPS = 8  # fewer leave the three fp64 backward accumulators short of registers (spills)
# Merges of the per-program partials: tiles of MERGE_BLOCK_G partials x MERGE_BLOCK_C channels, each tile's
# partials combined by a tree (tl.sum), the tiles in order. A merge walking the partials one by one, each step
# waiting on its loads, took about 0.35 us per partial on an H200: with 784 partials per channel (32x64x56x56
# channels-last) the training forward took 270 us against 46 us for the CUDA C++ kernels, in proportion to the
# partials at the other stages.
MERGE_BLOCK_G, MERGE_BLOCK_C, MERGE_WARPS = 64, 32, 8

# Elementwise: (rows, columns) of the (ROWS, COLS) view per program. NCHW: rows = N*C, cols = S;
# channels-last: rows = N*S, cols = C.
ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK_R": r, "BLOCK_COLS": c}, num_warps=w)
    for r, c, w in [(1, 1024, 4), (1, 2048, 8), (2, 512, 4), (4, 256, 4), (8, 128, 4), (16, 64, 4), (32, 64, 8),
                    (32, 32, 4), (64, 32, 8)]
]
# The memory-efficient dx recovers the input from the output (two divisions per element): at most 4 elements
# per thread, which keeps it free of register spills.
FROM_OUTPUT_CONFIGS = [
    triton.Config({"BLOCK_R": r, "BLOCK_COLS": c}, num_warps=w)
    for r, c, w in [(1, 512, 4), (1, 1024, 8), (2, 256, 4), (4, 128, 4), (8, 64, 4), (16, 32, 4), (16, 64, 8)]
]


# ----------------------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _activate(z, a, ACT: tl.constexpr):
    if ACT == PRELU:
        return tl.where(z > 0, z, a * z)
    return tl.where(z <= 0, 0.0, z)  # NaN stays NaN, as torch.relu


@triton.jit
def _grad_z(z, dy, a, ACT: tl.constexpr):
    if ACT == PRELU:
        return tl.where(z > 0, dy, a * dy)
    return tl.where(z <= 0, 0.0, dy)  # as threshold_backward


@triton.jit
def _block_start(block, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """First index of block number `block`, in 64-bit arithmetic where offsets can pass 2**31."""
    if INDEX_64:
        block = block.to(tl.int64)
    return block * BLOCK


@triton.jit
def _chan_merge(count, mean, m2, b_count, b_mean, b_m2):
    """Chan et al.: merge (b_count, b_mean, b_m2) into (count, mean, m2); counts may be 0. Where a mean is
    infinite (an infinite input) the weighted sum keeps it (inf, or NaN from inf and -inf, as PyTorch's sums)
    where mean + delta * w would be inf - inf. Merging with an empty side adds no delta^2 term, which would be
    inf * 0 = NaN where delta^2 overflows (|x| > ~1e19 in fp32: the variance is then infinite, not NaN): delta
    is zeroed, not the product, which keeps the term's fused multiply-add."""
    total = count + b_count
    safe = tl.maximum(total, 1.0)
    delta = b_mean - mean
    w = b_count / safe
    mean = tl.where(delta - delta == 0.0, mean + delta * w, mean * (count / safe) + b_mean * w)
    spread = tl.where((count > 0) & (b_count > 0), delta, 0.0)
    m2 = m2 + b_m2 + spread * spread * (count * b_count / safe)
    return total, mean, m2


# ----------------------------------------------------------------------------------------------------------
# Training statistics: per-program (mean, M2) partials, then a fixed-order merge


@triton.jit
def _stats_nchw_kernel(x_ptr, part_mean_ptr, part_m2_ptr, C, S, M, ITERS,
                       BLOCK: tl.constexpr, ACC: tl.constexpr, INDEX_64: tl.constexpr):
    c = tl.program_id(0)
    g = tl.program_id(1)
    count = tl.zeros((), ACC)
    mean = tl.zeros((), ACC)
    m2 = tl.zeros((), ACC)
    for i in range(ITERS):
        m = _block_start(g * ITERS + i, BLOCK, INDEX_64) + tl.arange(0, BLOCK)
        mask = m < M
        n = m // S
        x = tl.load(x_ptr + (n * C + c) * S + (m - n * S), mask=mask, other=0.0).to(ACC)
        b_count = tl.sum(mask.to(ACC), axis=0)
        b_mean = tl.sum(x, axis=0) / tl.maximum(b_count, 1.0)
        d = tl.where(mask, x - b_mean, 0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, b_count, b_mean, tl.sum(d * d, axis=0))
    tl.store(part_mean_ptr + g * C + c, mean)
    tl.store(part_m2_ptr + g * C + c, m2)


@triton.jit
def _stats_cl_kernel(x_ptr, part_mean_ptr, part_m2_ptr, C, R, ITERS,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, INDEX_64: tl.constexpr):
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = tl.zeros((), ACC)
    mean = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    for i in range(ITERS):
        rows = _block_start(g * ITERS + i, BLOCK_R, INDEX_64) + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC)
        b_count = tl.sum((rows < R).to(ACC), axis=0)
        b_mean = tl.sum(x, axis=0) / tl.maximum(b_count, 1.0)
        d = tl.where(mask, x - b_mean[None, :], 0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, b_count, b_mean, tl.sum(d * d, axis=0))
    tl.store(part_mean_ptr + g * C + cols, mean, mask=col_mask)
    tl.store(part_m2_ptr + g * C + cols, m2, mask=col_mask)


@triton.jit
def _partial_tile(g0, C, G, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows g0 .. g0 + BLOCK_G of this program's channel columns in a (G, C) buffer of partials: (offsets, row
    indices, row mask, mask)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    gs = g0 + tl.arange(0, BLOCK_G)
    g_mask = gs < G
    mask = g_mask[:, None] & (cols < C)[None, :]
    return gs[:, None] * C + cols[None, :], gs, g_mask, mask


@triton.jit
def _stats_merge_kernel(part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr, invstd_ptr, C, G, CHUNK, M, eps,
                        BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    # Partial g holds n_g = min(CHUNK, M - g * CHUNK) elements of every channel. A tile of partials combines as
    # n = sum n_g, mean = sum n_g mean_g / n, M2 = sum (M2_g + n_g (mean_g - mean)^2), the tiles then merged in
    # order (Chan et al.); all in fp64, as the CUDA C++ and CPU kernels (in fp32, hundreds of merges lost enough
    # of the mean that recomputed activations near 0 took the other branch). Writes the mean, the biased
    # variance var = M2 / M and invstd = 1 / sqrt(var + eps).
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = tl.zeros((), tl.float64)
    mean = tl.zeros((BLOCK_C,), tl.float64)
    m2 = tl.zeros((BLOCK_C,), tl.float64)
    for g0 in range(0, G, BLOCK_G):
        offsets, gs, g_mask, mask = _partial_tile(g0, C, G, BLOCK_G, BLOCK_C)
        n = tl.where(g_mask, tl.minimum(CHUNK, M - gs.to(tl.int64) * CHUNK), 0).to(tl.float64)
        b_mean = tl.load(part_mean_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
        b_m2 = tl.load(part_m2_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
        t_count = tl.sum(n, axis=0)
        t_mean = tl.sum(n[:, None] * b_mean, axis=0) / tl.maximum(t_count, 1.0)
        d = tl.where(mask, b_mean - t_mean[None, :], 0.0)
        t_m2 = tl.sum(b_m2 + n[:, None] * d * d, axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, t_count, t_mean, t_m2)
    var = m2 / M
    out = mean_ptr.dtype.element_ty
    tl.store(mean_ptr + cols, mean.to(out), mask=col_mask)
    tl.store(var_ptr + cols, var.to(out), mask=col_mask)
    tl.store(invstd_ptr + cols, (1.0 / tl.sqrt(var + eps)).to(out), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------
# Elementwise passes over the (ROWS, COLS) view: forward apply and backward dx


@triton.jit
def _tile(ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_COLS: tl.constexpr, INDEX_64: tl.constexpr):
    """Rows, columns and mask of this program's tile. The grid is 1-D (a 2-D grid would hit CUDA's limit of
    65535 on its second axis for large spatial sizes); column blocks vary fastest."""
    col_blocks = tl.cdiv(COLS, BLOCK_COLS)
    pid = tl.program_id(0)
    rows = _block_start(pid // col_blocks, BLOCK_R, INDEX_64) + tl.arange(0, BLOCK_R)
    cols = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return rows, cols, (rows < ROWS)[:, None] & (cols < COLS)[None, :]


@triton.jit
def _channel_values(ptr, rows, cols, C, ROWS, COLS, stride, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr):
    """A per-channel vector for a (rows, cols) tile: read once per column (channels-last: the column is the
    channel) or once per row (NCHW: the channel is the row modulo C), then broadcast over the tile."""
    if CHANNELS_LAST:
        v = tl.load(ptr + cols * stride, mask=cols < COLS, other=0.0)[None, :]
    else:
        v = tl.load(ptr + (rows % C) * stride, mask=rows < ROWS, other=0.0)[:, None]
    return tl.broadcast_to(v.to(ACC), (rows.shape[0], cols.shape[0]))


@triton.jit
def _tile_channel_params(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope_ptr, slope_stride, rows, cols, C, ROWS,
                         COLS, ACT: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                         ACC: tl.constexpr):
    """(mean, invstd, scale = gamma * invstd, shift = beta, slope) broadcast over a (rows, cols) tile."""
    mean = _channel_values(mean_ptr, rows, cols, C, ROWS, COLS, 1, CHANNELS_LAST, ACC)
    invstd = _channel_values(invstd_ptr, rows, cols, C, ROWS, COLS, 1, CHANNELS_LAST, ACC)
    scale = invstd
    shift = tl.zeros_like(scale)
    if AFFINE:
        scale = scale * _channel_values(weight_ptr, rows, cols, C, ROWS, COLS, 1, CHANNELS_LAST, ACC)
        shift = _channel_values(bias_ptr, rows, cols, C, ROWS, COLS, 1, CHANNELS_LAST, ACC)
    a = tl.zeros_like(scale)
    if ACT == PRELU:
        a = _channel_values(slope_ptr, rows, cols, C, ROWS, COLS, slope_stride, CHANNELS_LAST, ACC)
    return mean, invstd, scale, shift, a


@triton.jit
def _apply_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope_ptr, slope_stride,
                  C, ROWS, COLS, ROWS_CLASS,
                  ACT: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                  INDEX_64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows, cols, mask = _tile(ROWS, COLS, BLOCK_R, BLOCK_COLS, INDEX_64)
    mean, _invstd, scale, shift, a = _tile_channel_params(
        mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope_ptr, slope_stride, rows, cols, C, ROWS, COLS,
        ACT, AFFINE, CHANNELS_LAST, ACC)
    offsets = rows[:, None] * COLS + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    z = (x - mean) * scale + shift
    tl.store(y_ptr + offsets, _activate(z, a, ACT).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope_ptr, slope_stride,
               grad_weight_ptr, grad_bias_ptr, M, C, ROWS, COLS, ROWS_CLASS,
               ACT: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
               INDEX_64: tl.constexpr, BATCH_STATS: tl.constexpr, FROM_OUTPUT: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # dx = A * dz + B * (x - mean) + D,  A = gamma * invstd,  B = -A * invstd * dgamma / M,  D = -A * dbeta / M
    rows, cols, mask = _tile(ROWS, COLS, BLOCK_R, BLOCK_COLS, INDEX_64)
    mean, invstd, scale, shift, a = _tile_channel_params(
        mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope_ptr, slope_stride, rows, cols, C, ROWS, COLS,
        ACT, AFFINE, CHANNELS_LAST, ACC)
    offsets = rows[:, None] * COLS + cols[None, :]
    xc, z = _centred_and_z(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC), mean, scale, shift, a,
                           FROM_OUTPUT)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
    dx = scale * _grad_z(z, dy, a, ACT)
    if BATCH_STATS:
        dgamma = _channel_values(grad_weight_ptr, rows, cols, C, ROWS, COLS, 1, CHANNELS_LAST, ACC)
        dbeta = _channel_values(grad_bias_ptr, rows, cols, C, ROWS, COLS, 1, CHANNELS_LAST, ACC)
        # the xc term is 0 where dgamma is (zero sums), for an infinite x too: as PyTorch
        dx = dx - scale / tl.cast(M, ACC) * (tl.where(dgamma == 0, 0.0, invstd * dgamma * xc) + dbeta)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_apply_tuned = triton.autotune(ELEMENTWISE_CONFIGS, key=["COLS", "ROWS_CLASS", "CHANNELS_LAST"])(_apply_kernel)
_dx_tuned = triton.autotune(ELEMENTWISE_CONFIGS, key=["COLS", "ROWS_CLASS", "CHANNELS_LAST"])(_dx_kernel)
_dx_from_output_tuned = triton.autotune(FROM_OUTPUT_CONFIGS, key=["COLS", "ROWS_CLASS", "CHANNELS_LAST"])(_dx_kernel)


# ----------------------------------------------------------------------------------------------------------
# Backward reduction: per-program sums of dz, dz * (x - mean) and dy * min(z, 0), then a fixed-order sum


@triton.jit
def _centred_and_z(v, mean, scale, shift, a, FROM_OUTPUT: tl.constexpr):
    """(x - mean, z) from the pass's input v: x itself, or, in the memory-efficient mode, the output y
    (every slope a > 0 and scale != 0): z = y > 0 ? y : y / a,  x - mean = (z - beta) / scale."""
    if FROM_OUTPUT:
        z = tl.where(v > 0, v, v / a)
        return (z - shift) / scale, z
    xc = v - mean
    return xc, xc * scale + shift


@triton.jit
def _bwd_terms(x, dy, mean, scale, shift, a, mask, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    xc, z = _centred_and_z(x, mean, scale, shift, a, FROM_OUTPUT)
    dz = tl.where(mask, _grad_z(z, dy, a, ACT), 0.0)
    neg = tl.where(mask, tl.where(z > 0, 0.0, z * dy), 0.0)  # dy * min(z, 0), NaN propagating
    return dz, dz * xc, neg


@triton.jit
def _bwd_reduce_nchw_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope_ptr, slope_stride,
                            part_ptr, C, S, M, G, ITERS,
                            ACT: tl.constexpr, AFFINE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                            INDEX_64: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    c = tl.program_id(0)
    g = tl.program_id(1)
    mean = tl.load(mean_ptr + c)
    scale = tl.load(invstd_ptr + c)
    shift = tl.zeros_like(scale)
    if AFFINE:
        scale = scale * tl.load(weight_ptr + c).to(ACC)
        shift = tl.load(bias_ptr + c).to(ACC)
    a = tl.zeros_like(scale)
    if ACT == PRELU:
        a = tl.load(slope_ptr + c * slope_stride).to(ACC)
    sum_dz = tl.zeros((BLOCK,), ACC)
    sum_dzx = tl.zeros((BLOCK,), ACC)
    sum_neg = tl.zeros((BLOCK,), ACC)
    for i in range(ITERS):
        m = _block_start(g * ITERS + i, BLOCK, INDEX_64) + tl.arange(0, BLOCK)
        mask = m < M
        n = m // S
        offsets = (n * C + c) * S + (m - n * S)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dz, dzx, neg = _bwd_terms(x, dy, mean, scale, shift, a, mask, ACT, FROM_OUTPUT)
        sum_dz += dz
        sum_dzx += dzx
        sum_neg += neg
    tl.store(part_ptr + g * C + c, tl.sum(sum_dz, axis=0))
    tl.store(part_ptr + (G + g) * C + c, tl.sum(sum_dzx, axis=0))
    tl.store(part_ptr + (2 * G + g) * C + c, tl.sum(sum_neg, axis=0))


@triton.jit
def _bwd_reduce_cl_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope_ptr, slope_stride,
                          part_ptr, C, R, G, ITERS,
                          ACT: tl.constexpr, AFFINE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          ACC: tl.constexpr, INDEX_64: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)[None, :]
    scale = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0)[None, :]
    shift = tl.zeros_like(scale)
    if AFFINE:
        scale = scale * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        shift = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    a = tl.zeros_like(scale)
    if ACT == PRELU:
        a = tl.load(slope_ptr + cols * slope_stride, mask=col_mask, other=0.0).to(ACC)[None, :]
    sum_dz = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    sum_dzx = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    sum_neg = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    for i in range(ITERS):
        rows = _block_start(g * ITERS + i, BLOCK_R, INDEX_64) + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & col_mask[None, :]
        offsets = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dz, dzx, neg = _bwd_terms(x, dy, mean, scale, shift, a, mask, ACT, FROM_OUTPUT)
        sum_dz += dz
        sum_dzx += dzx
        sum_neg += neg
    tl.store(part_ptr + g * C + cols, tl.sum(sum_dz, axis=0), mask=col_mask)
    tl.store(part_ptr + (G + g) * C + cols, tl.sum(sum_dzx, axis=0), mask=col_mask)
    tl.store(part_ptr + (2 * G + g) * C + cols, tl.sum(sum_neg, axis=0), mask=col_mask)


@triton.jit
def _bwd_finalize_kernel(part_ptr, invstd_ptr, grad_weight_ptr, grad_bias_ptr, grad_slope_ptr, C, G,
                         ACT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    # The partials summed in fp64 in tiles, as the statistics' merge: a tree within a tile, the tiles in order.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    sum_dz = tl.zeros((BLOCK_C,), tl.float64)
    sum_dzx = tl.zeros((BLOCK_C,), tl.float64)
    sum_neg = tl.zeros((BLOCK_C,), tl.float64)
    for g0 in range(0, G, BLOCK_G):
        offsets, _, _, mask = _partial_tile(g0, C, G, BLOCK_G, BLOCK_C)
        sum_dz += tl.sum(tl.load(part_ptr + offsets, mask=mask, other=0.0).to(tl.float64), axis=0)
        sum_dzx += tl.sum(tl.load(part_ptr + G * C + offsets, mask=mask, other=0.0).to(tl.float64), axis=0)
        sum_neg += tl.sum(tl.load(part_ptr + 2 * G * C + offsets, mask=mask, other=0.0).to(tl.float64), axis=0)
    invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0).to(tl.float64)
    out = grad_bias_ptr.dtype.element_ty
    tl.store(grad_bias_ptr + cols, sum_dz.to(out), mask=col_mask)
    tl.store(grad_weight_ptr + cols, (sum_dzx * invstd).to(out), mask=col_mask)
    if ACT == PRELU:
        tl.store(grad_slope_ptr + cols, sum_neg.to(out), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers


def channels_last(x):
    """True when x is walked as a row-major (N * S, C) matrix (as the CPU kernels decide)."""
    spatial = x.numel() // max(1, x.shape[0] * x.shape[1]) if x.shape[0] * x.shape[1] else 1
    dense_cl = x.movedim(1, -1).is_contiguous()
    if not (x.is_contiguous() or dense_cl):
        raise ValueError(f"input: expected a contiguous or channels-last tensor, got strides {x.stride()}")
    return dense_cl and (spatial == 1 or not x.is_contiguous())


def _acc(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


class _Geometry:
    """Sizes of the (N, C, S) view and the reduction split, which depends on the shape only."""

    def __init__(self, x):
        self.N, self.C = x.shape[0], x.shape[1]
        self.S = x.numel() // max(1, self.N * self.C) if self.N * self.C else 1
        self.M = self.N * self.S
        self.channels_last = channels_last(x)
        self.index_64 = x.numel() >= 2**31
        if self.channels_last:
            steps = triton.cdiv(self.M, REDUCE_BLOCK_R)
            programs_per_group = triton.cdiv(self.C, REDUCE_BLOCK_C)
            self.chunk_unit = REDUCE_BLOCK_R
        else:
            steps = triton.cdiv(self.M, REDUCE_BLOCK)
            programs_per_group = self.C
            self.chunk_unit = REDUCE_BLOCK
        groups = max(1, min(steps, TARGET_PROGRAMS // max(1, programs_per_group)))
        self.iters = max(1, triton.cdiv(steps, groups))
        self.groups = max(1, triton.cdiv(steps, self.iters))
        self.chunk = self.iters * self.chunk_unit  # elements (NCHW) or rows (channels-last) per partial
        self.rows, self.cols = (self.M, self.C) if self.channels_last else (self.N * self.C, self.S)


def _elementwise_launch(kernel_jit, kernel_tuned, geo, args, constexprs):
    """Launches an elementwise kernel: autotuned on a GPU, a heuristic tile in the interpreter (which cannot
    autotune) and where FUSEDRECT_TRITON_AUTOTUNE=0."""
    grid_rows_cols = (geo.rows, geo.cols)
    rows_class = triton.next_power_of_2(max(1, geo.rows))
    if INTERPRET or os.environ.get("FUSEDRECT_TRITON_AUTOTUNE") == "0":
        block_cols = min(2048, triton.next_power_of_2(max(1, geo.cols)))
        block_r = max(1, min(64, 2048 // block_cols))
        grid = (triton.cdiv(geo.rows, block_r) * triton.cdiv(geo.cols, block_cols),)
        kernel_jit[grid](*args, *grid_rows_cols, rows_class, **constexprs, BLOCK_R=block_r, BLOCK_COLS=block_cols)
        return

    def grid(meta):
        return (triton.cdiv(geo.rows, meta["BLOCK_R"]) * triton.cdiv(geo.cols, meta["BLOCK_COLS"]),)

    kernel_tuned[grid](*args, *grid_rows_cols, rows_class, **constexprs)


def _per_channel(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


def _affine_args(weight, bias, C, dtype, device):
    """(weight, bias, AFFINE): a missing half of an affine pair becomes ones / zeros."""
    if weight is None and bias is None:
        return None, None, False
    weight = torch.ones(C, dtype=dtype, device=device) if weight is None else weight.contiguous()
    bias = torch.zeros(C, dtype=dtype, device=device) if bias is None else bias.contiguous()
    return weight, bias, True


def _slope_args(slope):
    if slope is None:
        return None, 0, RELU.value
    return slope.contiguous(), 0 if slope.numel() == 1 else 1, PRELU.value


def _on_device(launcher):
    """Runs ``launcher`` with its input's CUDA device current: Triton launches on the current device and stream."""

    @functools.wraps(launcher)
    def launch(*args):
        x = args[1] if launcher.__name__.startswith("bn_act_bwd") else args[0]
        if x.device.type != "cuda":
            return launcher(*args)
        with torch.cuda.device(x.device):
            return launcher(*args)

    return launch


@_on_device
def bn_act_fwd_train(x, weight, bias, slope, eps):
    """Training forward: (y, mean, invstd) with fp32 (fp64 for fp64 input) statistics."""
    geo = _Geometry(x)
    y = torch.empty_like(x)
    mean, _var, invstd = _batch_stats(x, eps, geo)
    if geo.M:
        _apply(x, y, mean, invstd, weight, bias, slope, geo)
    return y, mean, invstd


@_on_device
def batch_stats(x, eps):
    """Per-channel (mean, invstd) of x's batch: the statistics half of the training forward."""
    mean, _var, invstd = _batch_stats(x, eps, _Geometry(x))
    return mean, invstd


@_on_device
def bn_stats(x):
    """Per-channel (mean, biased var) of x's batch (for SyncBN, which merges them over ranks)."""
    mean, var, _invstd = _batch_stats(x, 1.0, _Geometry(x))  # invstd unused (eps 1 keeps it finite)
    return mean, var


def _batch_stats(x, eps, geo):
    """(mean, var, invstd) per channel; mean 0, var 0 for an empty batch."""
    stats = stats_dtype(x)
    if geo.M == 0:
        zeros = torch.zeros(geo.C, dtype=stats, device=x.device)
        return zeros, zeros.clone(), torch.full_like(zeros, eps).rsqrt_()
    part_mean = torch.empty(geo.groups, geo.C, dtype=stats, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    acc = _acc(x)
    if geo.channels_last:
        _stats_cl_kernel[(geo.groups, triton.cdiv(geo.C, REDUCE_BLOCK_C))](
            x, part_mean, part_m2, geo.C, geo.M, geo.iters,
            BLOCK_R=REDUCE_BLOCK_R, BLOCK_C=REDUCE_BLOCK_C, ACC=acc, INDEX_64=geo.index_64, num_warps=REDUCE_WARPS)
    else:
        _stats_nchw_kernel[(geo.C, geo.groups)](
            x, part_mean, part_m2, geo.C, geo.S, geo.M, geo.iters,
            BLOCK=REDUCE_BLOCK, ACC=acc, INDEX_64=geo.index_64, num_warps=REDUCE_WARPS)
    mean = torch.empty(geo.C, dtype=stats, device=x.device)
    var, invstd = torch.empty_like(mean), torch.empty_like(mean)
    _stats_merge_kernel[(triton.cdiv(geo.C, MERGE_BLOCK_C),)](
        part_mean, part_m2, mean, var, invstd, geo.C, geo.groups, geo.chunk, geo.M, eps,
        BLOCK_G=MERGE_BLOCK_G, BLOCK_C=MERGE_BLOCK_C, num_warps=MERGE_WARPS)
    return mean, var, invstd


@_on_device
def bn_act_fwd_eval(x, mean, invstd, weight, bias, slope):
    """Forward with the given per-channel statistics."""
    geo = _Geometry(x)
    y = torch.empty_like(x)
    if x.numel():
        stats = stats_dtype(x)
        _apply(x, y, _per_channel(mean, stats), _per_channel(invstd, stats), weight, bias, slope, geo)
    return y


def _apply(x, y, mean, invstd, weight, bias, slope, geo):
    weight, bias, affine = _affine_args(weight, bias, geo.C, mean.dtype, x.device)
    slope, slope_stride, act = _slope_args(slope)
    _elementwise_launch(
        _apply_kernel, _apply_tuned, geo,
        (x, y, mean, invstd, weight, bias, slope, slope_stride, geo.C),
        dict(ACT=act, AFFINE=affine, CHANNELS_LAST=geo.channels_last, ACC=_acc(x), INDEX_64=geo.index_64))


@_on_device
def bn_act_bwd(grad_out, x, mean, invstd, weight, bias, slope, batch_stats):
    """Backward: (grad_input, grad_weight, grad_bias, grad_slope); per-channel gradients in the statistics
    dtype, grad_slope per channel ((0,) for ReLU)."""
    return _backward(_BackwardArgs(grad_out, x, mean, invstd, weight, bias, slope, False), batch_stats)


@_on_device
def bn_act_bwd_from_output(grad_out, output, invstd, weight, bias, slope):
    """Training backward of BatchNorm + PReLU from the output y (memory-efficient mode; every slope > 0 and
    every |weight| > eps): as bn_act_bwd."""
    mean = torch.zeros(output.shape[1], dtype=stats_dtype(output), device=output.device)  # unused
    return _backward(_BackwardArgs(grad_out, output, mean, invstd, weight, bias, slope, True), True)


@_on_device
def bn_act_bwd_reduce(grad_out, x, mean, invstd, weight, bias, slope):
    """The reduce half of bn_act_bwd (for SyncBN): (sum_dz, sum_dz_xhat, grad_slope) = (dbeta, dgamma, da)."""
    return _backward_sums(_BackwardArgs(grad_out, x, mean, invstd, weight, bias, slope, False))


@_on_device
def bn_act_bwd_elemt(grad_out, x, mean, invstd, weight, bias, slope, sum_dz, sum_dz_xhat, count):
    """The elementwise half of bn_act_bwd (for SyncBN): dx, with the per-channel sums and the element count per
    channel given (over every rank)."""
    args = _BackwardArgs(grad_out, x, mean, invstd, weight, bias, slope, False)
    if args.geo.M and count < args.geo.M:
        raise ValueError(f"count: expected at least the input's {args.geo.M} elements per channel, got {count}")
    return _grad_input(args, _per_channel(sum_dz, args.stats), _per_channel(sum_dz_xhat, args.stats), count, True)


class _BackwardArgs:
    """The arguments of the backward kernels: x is the input, or the output where from_output."""

    def __init__(self, grad_out, x, mean, invstd, weight, bias, slope, from_output):
        self.geo = _Geometry(x)
        if channels_last(grad_out) != self.geo.channels_last or grad_out.shape != x.shape:
            raise ValueError("grad_out: expected the shape and memory layout of input")
        self.stats = stats_dtype(x)
        self.grad_out, self.x, self.from_output = grad_out, x, from_output
        self.mean, self.invstd = _per_channel(mean, self.stats), _per_channel(invstd, self.stats)
        self.weight, self.bias, self.affine = _affine_args(weight, bias, self.geo.C, self.stats, x.device)
        self.slope, self.slope_stride, self.act = _slope_args(slope)

    def kernel_args(self):
        """The leading arguments every backward kernel takes."""
        return (self.mean, self.invstd, self.weight, self.bias, self.slope, self.slope_stride)


def _backward(args, batch_stats):
    """Both halves: (grad_input, grad_weight, grad_bias, grad_slope)."""
    sum_dz, sum_dz_xhat, grad_slope = _backward_sums(args)
    return _grad_input(args, sum_dz, sum_dz_xhat, args.geo.M, batch_stats), sum_dz_xhat, sum_dz, grad_slope


def _backward_sums(args):
    """Per-program partials of sum dz, sum dz * (x - mean) and sum dy * min(z, 0), then a fixed-order sum over
    programs: (sum_dz, sum_dz_xhat = invstd * sum dz * (x - mean), grad_slope)."""
    geo, device = args.geo, args.x.device
    sum_dz = torch.zeros(geo.C, dtype=args.stats, device=device)
    sum_dz_xhat = torch.zeros_like(sum_dz)
    grad_slope = torch.zeros(geo.C if args.act == PRELU.value else 0, dtype=args.stats, device=device)
    if geo.M == 0:
        return sum_dz, sum_dz_xhat, grad_slope
    acc = _acc(args.x)
    partials = torch.empty(3, geo.groups, geo.C, dtype=args.stats, device=device)
    common = (args.grad_out, args.x, *args.kernel_args(), partials)
    flags = dict(ACT=args.act, AFFINE=args.affine, ACC=acc, INDEX_64=geo.index_64, FROM_OUTPUT=args.from_output,
                 num_warps=REDUCE_WARPS)
    if geo.channels_last:
        _bwd_reduce_cl_kernel[(geo.groups, triton.cdiv(geo.C, REDUCE_BLOCK_C))](
            *common, geo.C, geo.M, geo.groups, geo.iters, BLOCK_R=REDUCE_BLOCK_R, BLOCK_C=REDUCE_BLOCK_C, **flags)
    else:
        _bwd_reduce_nchw_kernel[(geo.C, geo.groups)](
            *common, geo.C, geo.S, geo.M, geo.groups, geo.iters, BLOCK=REDUCE_BLOCK, **flags)
    _bwd_finalize_kernel[(triton.cdiv(geo.C, MERGE_BLOCK_C),)](
        partials, args.invstd, sum_dz_xhat, sum_dz, grad_slope, geo.C, geo.groups,
        ACT=args.act, BLOCK_G=MERGE_BLOCK_G, BLOCK_C=MERGE_BLOCK_C, num_warps=MERGE_WARPS)
    return sum_dz, sum_dz_xhat, grad_slope


def _grad_input(args, sum_dz, sum_dz_xhat, count, batch_stats):
    """dx = gamma * invstd * (dz - sum_dz / count - xhat * sum_dz_xhat / count) (batch_stats), else
    gamma * invstd * dz."""
    geo = args.geo
    grad_input = torch.empty_like(args.x)
    if geo.M == 0:
        return grad_input
    _elementwise_launch(
        _dx_kernel, _dx_from_output_tuned if args.from_output else _dx_tuned, geo,
        (args.grad_out, args.x, grad_input, *args.kernel_args(), sum_dz_xhat, sum_dz, count, geo.C),
        dict(ACT=args.act, AFFINE=args.affine, CHANNELS_LAST=geo.channels_last, ACC=_acc(args.x),
             INDEX_64=geo.index_64, BATCH_STATS=batch_stats, FROM_OUTPUT=args.from_output))
    return grad_input
