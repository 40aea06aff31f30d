"""The Triton kernels of fused GKA (``vit_gka.layers.gka_triton`` registers them as torch operators).

Per batch b and head h, on the head's slice x (N x d) of the LayerNorm'd tokens, with s = 1 / sigma_h^2:

    S_ij = s (x_i . x_j - ||x_j||^2 / 2),   P = softmax_j(S),   O = P X           (q = s x, k = v = x)

the paper's Eq. 2-6 after the row normalisation cancels ||x_i||^2 (``vit_gka.layers.gka``). Each kernel reads
x in place as (B, N, H, d) through its strides and writes in that layout, so no permute or padding copy
surrounds it. A key tile is loaded once and serves as keys and values; its squared norms (the bias) are
computed from it in float32. The forward keeps O and the row log-sum-exp L (base 2, in units of S * log2 e).

The backward has FlashAttention-2's structure: the program that owns a block of keys accumulates dk, dv and
the bias gradient over the query blocks that see it (no atomics), then, owning the same rows as queries,
their dq; the three roles of x meet in one store, dx = s (dq + dk - x dbias) + dv, with dk = dS^T X here (its
factor s applied once at the end). The bandwidth's gradient dL/ds = sum_j (x_j . dk_j - dbias_j ||x_j||^2 / 2)
is written as one term per token and summed by the caller (deterministic, whatever the tile size).

Masks are structural only (causal, the paper's 1-D window, a 2-D window of radius r on the patch grid with
prefix tokens that see and are seen by all), evaluated per element exactly as ``masks.structural_mask_mod``;
each program visits only the key (or query) range its block can see, which is where windows save work.

``DOT_F32`` loads the dot products' inputs as float32: for float32 inputs (IEEE products, no TF32) and under
Triton's CPU interpreter, whose 16-bit dots are wrong; on a GPU 16-bit inputs go to the tensor cores as they
are, with float32 accumulation.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: kernels may read no other globals


@triton.jit
def _allowed(qi, kj, window, radius, prefix, grid_w,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GRID: tl.constexpr):
    """Which (query, key) pairs the structural masks keep (``masks.structural_mask_mod``, Eq. 7)."""
    diff = qi - kj
    keep = diff == diff
    if CAUSAL:
        keep = keep & (diff >= 0)
    if WINDOW:
        if CAUSAL:
            keep = keep & (diff < window)
        else:
            keep = keep & (diff < window) & (diff > -window)
    if GRID:
        pq = qi - prefix
        pk = kj - prefix
        row = tl.abs(pq // grid_w - pk // grid_w) <= radius
        col = tl.abs(pq % grid_w - pk % grid_w) <= radius
        keep = keep & ((qi < prefix) | (kj < prefix) | (row & col))
    return keep


@triton.jit
def _key_range(m0, rows, N, window, radius, prefix, grid_w,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GRID: tl.constexpr):
    """[lo, hi): the keys that queries m0 .. m0 + rows - 1 may see, except the prefix keys below lo (a 2-D window's
    prefix is visited separately)."""
    last = tl.minimum(m0 + rows, N) - 1
    lo = m0 * 0
    hi = N + m0 * 0
    if CAUSAL:
        hi = tl.minimum(hi, last + 1)
    if WINDOW:
        lo = tl.maximum(lo, m0 - window + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, last + window)
    if GRID:
        if m0 >= prefix:  # patch queries only: their grid rows +- r (prefix queries see every key)
            lo = tl.maximum(lo, prefix + tl.maximum((m0 - prefix) // grid_w - radius, 0) * grid_w)
            hi = tl.minimum(hi, prefix + ((last - prefix) // grid_w + radius + 1) * grid_w)
    return lo, hi


@triton.jit
def _query_range(n0, rows, N, window, radius, prefix, grid_w,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GRID: tl.constexpr):
    """[lo, hi): the queries that see keys n0 .. n0 + rows - 1, except the prefix queries below lo (every
    prefix query sees every key; the caller visits them separately)."""
    last = tl.minimum(n0 + rows, N) - 1
    lo = n0 * 0
    hi = N + n0 * 0
    if CAUSAL:
        lo = tl.maximum(lo, n0)
        if WINDOW:
            hi = tl.minimum(hi, last + window)
    elif WINDOW:
        lo = tl.maximum(lo, n0 - window + 1)
        hi = tl.minimum(hi, last + window)
    if GRID:
        if n0 >= prefix:  # patch keys only (a prefix key is seen by every query)
            lo = tl.maximum(lo, prefix + tl.maximum((n0 - prefix) // grid_w - radius, 0) * grid_w)
            hi = tl.minimum(hi, prefix + ((last - prefix) // grid_w + radius + 1) * grid_w)
    return lo, hi


@triton.jit
def _load_rows(base, offs, limit, offs_d, stride_n, stride_d, HEAD_DIM: tl.constexpr):
    """Rows ``offs`` (< limit) of one head, zero beyond the sequence and the head width."""
    ptrs = base + offs[:, None] * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=(offs[:, None] < limit) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _key_tile(x_base, offs, limit, stride_n, stride_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
              DOT_F32: tl.constexpr):
    """Rows ``offs`` (< limit) as keys and values, and their bias ||x_j||^2 / 2 in float32 (from the same load)."""
    k = _load_rows(x_base, offs, limit, tl.arange(0, D_PAD), stride_n, stride_d, HEAD_DIM)
    kf = k.to(tl.float32)
    if DOT_F32:
        k = kf
    return k, 0.5 * tl.sum(kf * kf, axis=1)


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    """a @ b accumulated in float32: IEEE float32 products, or b's 16-bit dtype on the tensor cores."""
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision='ieee')
    else:
        out = tl.dot(a.to(b.dtype), b)
    return out


@triton.jit
def _fwd_block(acc, m_i, l_i, q, offs_m, start, limit, x_base, stride_n, stride_d, scale2,
               window, radius, prefix, grid_w,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, GRID: tl.constexpr, DOT_F32: tl.constexpr):
    """One key tile of the online softmax: keys start .. start + BLOCK_N - 1 (< limit)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    k, bias = _key_tile(x_base, offs_n, limit, stride_n, stride_d, HEAD_DIM, D_PAD, DOT_F32)
    z = (_dot(q, tl.trans(k), DOT_F32) - bias[None, :]) * scale2
    keep = (offs_n[None, :] < limit) & _allowed(offs_m[:, None], offs_n[None, :], window, radius, prefix, grid_w,
                                                CAUSAL, WINDOW, GRID)
    z = tl.where(keep, z, float('-inf'))
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    m_use = tl.where(m_new == float('-inf'), 0.0, m_new)  # a row with nothing kept yet stays at zero weight
    p = tl.exp2(z - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p, k, DOT_F32)
    return acc, m_new, l_i


@triton.jit
def gka_fwd_kernel(X, O, LSE, S_INV, N, H,
                   stride_xb, stride_xn, stride_xh, stride_xd, stride_ob, stride_on, stride_oh, stride_od,
                   window, radius, prefix, grid_w,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GRID: tl.constexpr, DOT_F32: tl.constexpr):
    """O and L for one block of BLOCK_M queries of one (b, h): grid (cdiv(N, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    scale2 = tl.load(S_INV + h).to(tl.float32) * LOG2E
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    x_base = X + b * stride_xb + h * stride_xh
    q = _load_rows(x_base, offs_m, N, offs_d, stride_xn, stride_xd, HEAD_DIM)
    m_i = tl.full((BLOCK_M,), float('-inf'), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    lo, hi = _key_range(m0, BLOCK_M, N, window, radius, prefix, grid_w, CAUSAL, WINDOW, GRID)
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, offs_m, start, N, x_base, stride_xn, stride_xd, scale2,
                                   window, radius, prefix, grid_w,
                                   HEAD_DIM, D_PAD, BLOCK_N, CAUSAL, WINDOW, GRID, DOT_F32)
    if GRID:  # the prefix keys, which every query sees, when the window range left them out
        for start in range(0, tl.minimum(prefix, lo), BLOCK_N):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, offs_m, start, tl.minimum(prefix, lo), x_base,
                                       stride_xn, stride_xd, scale2, window, radius, prefix, grid_w,
                                       HEAD_DIM, D_PAD, BLOCK_N, CAUSAL, WINDOW, GRID, DOT_F32)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_safe), mask=offs_m < N)


@triton.jit
def gka_delta_kernel(O, DO, DELTA, N, H,
                     stride_ob, stride_on, stride_oh, stride_od, stride_gb, stride_gn, stride_gh, stride_gd,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """D_i = dO_i . O_i in float32, (B * H, N): grid (cdiv(N, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, N, offs_d, stride_on, stride_od, HEAD_DIM)
    g = _load_rows(DO + b * stride_gb + h * stride_gh, offs_m, N, offs_d, stride_gn, stride_gd, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1)
    tl.store(DELTA + bh * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _bwd_kv_block(dk, dv, dbias, k, bias_k, offs_k, start, q_limit, N, x_base, g_base, LSE_BH, DELTA_BH,
                  stride_xn, stride_xd, stride_gn, stride_gd, scale2, window, radius, prefix, grid_w,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr, GRID: tl.constexpr, DOT_F32: tl.constexpr):
    """Keys' dk (= dS^T X), dv and dbias from one block of queries start .. (< q_limit), transposed (keys x queries)."""
    offs_q = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(x_base, offs_q, q_limit, offs_d, stride_xn, stride_xd, HEAD_DIM)
    g = _load_rows(g_base, offs_q, q_limit, offs_d, stride_gn, stride_gd, HEAD_DIM)
    lse = tl.load(LSE_BH + offs_q, mask=offs_q < q_limit, other=0.0)
    delta = tl.load(DELTA_BH + offs_q, mask=offs_q < q_limit, other=0.0)
    qk_t = _dot(k, tl.trans(q), DOT_F32)
    dp_t = _dot(k, tl.trans(g), DOT_F32)
    keep = ((offs_q[None, :] < q_limit) & (offs_k[:, None] < N)
            & _allowed(offs_q[None, :], offs_k[:, None], window, radius, prefix, grid_w, CAUSAL, WINDOW, GRID))
    p_t = tl.where(keep, tl.exp2((qk_t - bias_k[:, None]) * scale2 - lse[None, :]), 0.0)
    ds_t = p_t * (dp_t - delta[None, :])
    dv += _dot(p_t, g, DOT_F32)
    dk += _dot(ds_t, q, DOT_F32)
    dbias += tl.sum(ds_t, axis=1)
    return dk, dv, dbias


@triton.jit
def _bwd_q_block(dq, q, g, lse, delta, offs_q, start, k_limit, x_base, stride_xn, stride_xd, scale2,
                 window, radius, prefix, grid_w,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr, GRID: tl.constexpr, DOT_F32: tl.constexpr):
    """Queries' dq (= dS X) from one block of keys start .. (< k_limit)."""
    offs_k = start + tl.arange(0, BLOCK)
    k, bias = _key_tile(x_base, offs_k, k_limit, stride_xn, stride_xd, HEAD_DIM, D_PAD, DOT_F32)
    qk = _dot(q, tl.trans(k), DOT_F32)
    dp = _dot(g, tl.trans(k), DOT_F32)
    keep = (offs_k[None, :] < k_limit) & _allowed(offs_q[:, None], offs_k[None, :], window, radius, prefix, grid_w,
                                                  CAUSAL, WINDOW, GRID)
    p = tl.where(keep, tl.exp2((qk - bias[None, :]) * scale2 - lse[:, None]), 0.0)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds, k, DOT_F32)
    return dq


@triton.jit
def gka_bwd_kernel(X, DO, LSE, DELTA, DX, DS_TOK, S_INV, N, H,
                   stride_xb, stride_xn, stride_xh, stride_xd, stride_gb, stride_gn, stride_gh, stride_gd,
                   stride_db, stride_dn, stride_dh, stride_dd,
                   window, radius, prefix, grid_w,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GRID: tl.constexpr, DOT_F32: tl.constexpr):
    """dx for one block of BLOCK tokens of one (b, h) in all three roles, and their terms of dL/ds:
    grid (cdiv(N, BLOCK), B * H); DS_TOK is (B * H, N)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tl.load(S_INV + h).to(tl.float32)
    scale2 = s * LOG2E
    n0 = pid * BLOCK
    offs = n0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    x_base = X + b * stride_xb + h * stride_xh
    g_base = DO + b * stride_gb + h * stride_gh
    LSE_BH = LSE + bh * N
    DELTA_BH = DELTA + bh * N

    x, bias = _key_tile(x_base, offs, N, stride_xn, stride_xd, HEAD_DIM, D_PAD, DOT_F32)
    xf = x.to(tl.float32)

    # These tokens as keys and values: loop over the queries that see them.
    dk = tl.zeros((BLOCK, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK, D_PAD), tl.float32)
    dbias = tl.zeros((BLOCK,), tl.float32)
    lo, hi = _query_range(n0, BLOCK, N, window, radius, prefix, grid_w, CAUSAL, WINDOW, GRID)
    for start in range(lo, hi, BLOCK):
        dk, dv, dbias = _bwd_kv_block(dk, dv, dbias, x, bias, offs, start, N, N, x_base, g_base, LSE_BH, DELTA_BH,
                                      stride_xn, stride_xd, stride_gn, stride_gd, scale2, window, radius, prefix,
                                      grid_w, HEAD_DIM, D_PAD, BLOCK, CAUSAL, WINDOW, GRID, DOT_F32)
    if GRID:  # the prefix queries, which see every key
        for start in range(0, tl.minimum(prefix, lo), BLOCK):
            dk, dv, dbias = _bwd_kv_block(dk, dv, dbias, x, bias, offs, start, tl.minimum(prefix, lo), N, x_base,
                                          g_base, LSE_BH, DELTA_BH, stride_xn, stride_xd, stride_gn, stride_gd,
                                          scale2, window, radius, prefix, grid_w,
                                          HEAD_DIM, D_PAD, BLOCK, CAUSAL, WINDOW, GRID, DOT_F32)

    # The same tokens as queries: loop over the keys they see.
    g = _load_rows(g_base, offs, N, offs_d, stride_gn, stride_gd, HEAD_DIM)
    lse = tl.load(LSE_BH + offs, mask=offs < N, other=0.0)
    delta = tl.load(DELTA_BH + offs, mask=offs < N, other=0.0)
    dq = tl.zeros((BLOCK, D_PAD), tl.float32)
    lo, hi = _key_range(n0, BLOCK, N, window, radius, prefix, grid_w, CAUSAL, WINDOW, GRID)
    for start in range(lo, hi, BLOCK):
        dq = _bwd_q_block(dq, x, g, lse, delta, offs, start, N, x_base, stride_xn, stride_xd, scale2,
                          window, radius, prefix, grid_w, HEAD_DIM, D_PAD, BLOCK, CAUSAL, WINDOW, GRID, DOT_F32)
    if GRID:
        for start in range(0, tl.minimum(prefix, lo), BLOCK):
            dq = _bwd_q_block(dq, x, g, lse, delta, offs, start, tl.minimum(prefix, lo), x_base, stride_xn,
                              stride_xd, scale2, window, radius, prefix, grid_w,
                              HEAD_DIM, D_PAD, BLOCK, CAUSAL, WINDOW, GRID, DOT_F32)

    dx = s * (dq + dk - xf * dbias[:, None]) + dv
    dx_ptrs = DX + b * stride_db + h * stride_dh + offs[:, None] * stride_dn + offs_d[None, :] * stride_dd
    tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=(offs[:, None] < N) & (offs_d[None, :] < HEAD_DIM))
    # These tokens' terms of dL/ds = sum_j x_j . dk_j - dbias_j ||x_j||^2 / 2
    tl.store(DS_TOK + bh * N + offs, tl.sum(xf * dk, axis=1) - dbias * bias, mask=offs < N)
