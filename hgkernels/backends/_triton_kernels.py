"""Triton kernels of the two backend primitives (docs/design.md §1–2): one launch per primitive call.

Imported only by `triton_backend` when a primitive runs, never by ``import hgkernels``.

Rows are read through the environment segments: environment ``env`` owns
``order[offsets[env]:offsets[env + 1]]`` and a row block is BLOCK_N consecutive
slots of one segment, so every per-environment sum is a loop inside one program
and all environments share one launch. Slots past the segment's end read sample 0
(finite data) with zh = 0, so they never reach a sum and are never stored.

The per-sample quantities p, r, q, s = V zh, t = A s live only in registers and
are recomputed where a program needs them rather than written out, the price of
one launch without scratch memory. A class tile needs the row's softmax max and
sum (an online pass over all C), and cross_entropy's A s = p ⊙ s - p (p · s)
needs the full p · s (a C x Dh contraction per row): every G/Dg program and every
HVP class-tile program redoes them, so those two kernels cost O(C^2 / BLOCK_C)
per row — negligible while C spans a few class tiles, wasteful for C in the
thousands. The backward does each contraction once per row.
Every dot runs in IEEE fp32 (no TF32), which the 1e-5 float32 contract needs.
"""
import triton
import triton.language as tl

# LOSS codes, in the order of hgkernels._inputs.LOSSES
CROSS_ENTROPY = tl.constexpr(0)
BINARY_CROSS_ENTROPY = tl.constexpr(1)
MSE = tl.constexpr(2)


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _segment_rows(order_ptr, start, count, block, BLOCK_N: tl.constexpr):
    """Sample ids of row block `block` of a segment and which slots hold a real sample."""
    slot = block * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = slot < count
    rows = tl.load(order_ptr + start + slot, mask=valid, other=0)
    return rows, valid


@triton.jit
def _load_zh(feat_ptr, f_sn, f_sd, rows, valid, d0, D, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_N, BLOCK_D) tile of zh = [z, 1] in fp32; zero on invalid slots and past Dh."""
    cols = d0 + tl.arange(0, BLOCK_D)
    zh = tl.load(feat_ptr + rows[:, None] * f_sn + cols[None, :] * f_sd,
                 mask=valid[:, None] & (cols[None, :] < D), other=0.0).to(tl.float32)
    if HAS_BIAS:
        zh = tl.where(valid[:, None] & (cols[None, :] == D), 1.0, zh)
    return zh


@triton.jit
def _mat_tile(mat_ptr, m_sc, m_sd, c0, d0, C, Dh, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_C, BLOCK_D) tile of a per-environment C x Dh matrix, zero outside it."""
    cols_c = c0 + tl.arange(0, BLOCK_C)
    cols_d = d0 + tl.arange(0, BLOCK_D)
    mask = (cols_c[:, None] < C) & (cols_d[None, :] < Dh)
    return tl.load(mat_ptr + cols_c[:, None] * m_sc + cols_d[None, :] * m_sd, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_softmax_scale(logit_ptr, l_sn, l_sc, rows, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row max m and 1 / sum_c exp(a_c - m) in one online pass over all C classes (C is bounded by
    memory, not registers). Softmax is then exp(a - m) / sum, as torch computes it: exp(a - lse)
    would lose ~ulp(|a|) of the largest probability, which cross_entropy's A s cancels against."""
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(logit_ptr + rows[:, None] * l_sn + cols[None, :] * l_sc,
                    mask=cols[None, :] < C, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(a, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(a - new_max[:, None]), axis=1)
        run_max = new_max
    return run_max, 1.0 / run_sum


@triton.jit
def _link_tile(logit_ptr, l_sn, l_sc, rows, row_max, inv_sum, c0, C,
               LOSS: tl.constexpr, BLOCK_C: tl.constexpr):
    """p on a class tile (softmax / sigmoid / the logits themselves for mse), zero past C."""
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    a = tl.load(logit_ptr + rows[:, None] * l_sn + cols[None, :] * l_sc, mask=cmask[None, :], other=0.0)
    a = a.to(tl.float32)
    if LOSS == CROSS_ENTROPY:
        p = tl.exp(a - row_max[:, None]) * inv_sum[:, None]
    elif LOSS == BINARY_CROSS_ENTROPY:
        e = tl.exp(-tl.abs(a))  # sigmoid without overflowing exp for large |a|
        p = tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    else:
        p = a
    return tl.where(cmask[None, :], p, 0.0), cols, cmask


@triton.jit
def _residual(p, cols, cmask, target_ptr, t_sn, t_sc, rows, C, LOSS: tl.constexpr):
    """r = N_e dL_e/da on a class tile."""
    if LOSS == CROSS_ENTROPY:
        label = tl.load(target_ptr + rows * t_sn)
        r = p - tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
        # a label outside [0, C) (validate=False) poisons the row with NaN, as on every backend
        r = tl.where(((label < 0) | (label >= C))[:, None], float("nan"), r)
    else:
        y = tl.load(target_ptr + rows[:, None] * t_sn + cols[None, :] * t_sc, mask=cmask[None, :], other=0.0)
        r = (p - y.to(tl.float32)) * _residual_slope(C, LOSS)
    return tl.where(cmask[None, :], r, 0.0)


@triton.jit
def _residual_slope(C, LOSS: tl.constexpr):
    """dr/dp: 1, 1/C, 2/C."""
    if LOSS == CROSS_ENTROPY:
        slope = 1.0
    elif LOSS == BINARY_CROSS_ENTROPY:
        slope = 1.0 / C
    else:
        slope = 2.0 / C
    return slope


@triton.jit
def _curvature(p, cmask, C, LOSS: tl.constexpr):
    """q = N_e times the diagonal of the logit Hessian."""
    if LOSS == CROSS_ENTROPY:
        q = p * (1.0 - p)
    elif LOSS == BINARY_CROSS_ENTROPY:
        q = p * (1.0 - p) / C
    else:
        q = tl.zeros_like(p) + 2.0 / C
    return tl.where(cmask[None, :], q, 0.0)


@triton.jit
def _curvature_slope(p, C, LOSS: tl.constexpr):
    """dq/dp (zero for mse)."""
    if LOSS == CROSS_ENTROPY:
        slope = 1.0 - 2.0 * p
    elif LOSS == BINARY_CROSS_ENTROPY:
        slope = (1.0 - 2.0 * p) / C
    else:
        slope = tl.zeros_like(p)
    return slope


@triton.jit
def _hess_apply(p, s, p_dot_s, cmask, C, LOSS: tl.constexpr):
    """A s on a class tile; cross_entropy needs p . s over all classes (`p_dot_s`)."""
    if LOSS == CROSS_ENTROPY:
        out = p * s - p * p_dot_s[:, None]
    else:
        out = _curvature(p, cmask, C, LOSS) * s
    return out


@triton.jit
def _hess_apply_grad_p(p, s, tau, p_dot_s, p_dot_tau, C, LOSS: tl.constexpr):
    """d<tau, A(p) s>/dp on a class tile (mse: zero, never called)."""
    if LOSS == CROSS_ENTROPY:
        out = tau * s - p_dot_s[:, None] * tau - p_dot_tau[:, None] * s
    else:
        out = tau * s * (1.0 - 2.0 * p) / C
    return out


@triton.jit
def _apply_tile(mat_ptr, m_sc, m_sd, feat_ptr, f_sn, f_sd, rows, valid, c0, C, D,
                SQUARE: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """mat zh (or mat (zh ⊙ zh) when SQUARE) on a class tile: (BLOCK_N, BLOCK_C), a loop over Dh."""
    Dh = D + HAS_BIAS
    out = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for d0 in range(0, Dh, BLOCK_D):
        zh = _load_zh(feat_ptr, f_sn, f_sd, rows, valid, d0, D, HAS_BIAS, BLOCK_D)
        if SQUARE:
            zh = zh * zh
        out += _dot(zh, tl.trans(_mat_tile(mat_ptr, m_sc, m_sd, c0, d0, C, Dh, BLOCK_C, BLOCK_D)))
    return out


@triton.jit
def _p_dot_apply(logit_ptr, l_sn, l_sc, row_max, inv_sum, mat_ptr, m_sc, m_sd, feat_ptr, f_sn, f_sd,
                 rows, valid, C, D, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """p . (mat zh) per row over all classes (softmax rows only)."""
    total = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        p, cols, cmask = _link_tile(logit_ptr, l_sn, l_sc, rows, row_max, inv_sum, c0, C, CROSS_ENTROPY, BLOCK_C)
        s = _apply_tile(mat_ptr, m_sc, m_sd, feat_ptr, f_sn, f_sd, rows, valid, c0, C, D, False, HAS_BIAS,
                        BLOCK_N, BLOCK_C, BLOCK_D)
        total += tl.sum(p * s, axis=1)
    return total


@triton.jit
def head_stats_kernel(logit_ptr, l_sn, l_sc, feat_ptr, f_sn, f_sd, target_ptr, t_sn, t_sc,
                      order_ptr, offsets_ptr, grad_ptr, diag_ptr, C, D, num_splits,
                      LOSS: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD: tl.constexpr, DIAG: tl.constexpr,
                      SQUARE_RESIDUAL: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial G and Dg over one split of a segment's row blocks (with SQUARE_RESIDUAL, the Dg slot
    weighs zh ⊙ zh by r ⊙ r: the per-sample gradients' second moment, Fishr).

    Grid: (class tiles x Dh tiles, E, splits). Program (tile, env, split) sums row
    blocks split, split + num_splits, ... of environment env into the
    (BLOCK_C, BLOCK_D) tile of its partial outputs (E, splits, C, Dh), already
    divided by N_e. Each program owns its output tile and sums in a fixed order.
    """
    Dh = D + HAS_BIAS
    num_dtiles = tl.cdiv(Dh, BLOCK_D)
    c0 = (tl.program_id(0) // num_dtiles) * BLOCK_C
    d0 = (tl.program_id(0) % num_dtiles) * BLOCK_D
    env = tl.program_id(1).to(tl.int64)  # int64: offsets into E x splits x C x Dh may pass 2^31
    split = tl.program_id(2)
    start = tl.load(offsets_ptr + env)
    count = tl.load(offsets_ptr + env + 1) - start

    grad_acc = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    diag_acc = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    for block in range(split, tl.cdiv(count, BLOCK_N), num_splits):
        rows, valid = _segment_rows(order_ptr, start, count, block, BLOCK_N)
        zh = _load_zh(feat_ptr, f_sn, f_sd, rows, valid, d0, D, HAS_BIAS, BLOCK_D)
        row_max = tl.zeros((BLOCK_N,), tl.float32)
        inv_sum = tl.zeros((BLOCK_N,), tl.float32)
        if LOSS == CROSS_ENTROPY:
            row_max, inv_sum = _row_softmax_scale(logit_ptr, l_sn, l_sc, rows, C, BLOCK_N, BLOCK_C)
        p, cols, cmask = _link_tile(logit_ptr, l_sn, l_sc, rows, row_max, inv_sum, c0, C, LOSS, BLOCK_C)
        if GRAD:
            r = _residual(p, cols, cmask, target_ptr, t_sn, t_sc, rows, C, LOSS)
            grad_acc += _dot(tl.trans(r), zh)
        if DIAG:
            if SQUARE_RESIDUAL:
                r_diag = _residual(p, cols, cmask, target_ptr, t_sn, t_sc, rows, C, LOSS)
                q = r_diag * r_diag
            else:
                q = _curvature(p, cmask, C, LOSS)
            diag_acc += _dot(tl.trans(q), zh * zh)

    inv_count = 1.0 / count.to(tl.float32)
    cols_c = c0 + tl.arange(0, BLOCK_C)
    cols_d = d0 + tl.arange(0, BLOCK_D)
    out_offsets = (env * num_splits + split) * C * Dh + cols_c[:, None] * Dh + cols_d[None, :]
    out_mask = (cols_c[:, None] < C) & (cols_d[None, :] < Dh)
    if GRAD:
        tl.store(grad_ptr + out_offsets, grad_acc * inv_count, mask=out_mask)
    if DIAG:
        tl.store(diag_ptr + out_offsets, diag_acc * inv_count, mask=out_mask)


@triton.jit
def head_hvp_kernel(logit_ptr, l_sn, l_sc, feat_ptr, f_sn, f_sd, order_ptr, offsets_ptr,
                    dir_ptr, v_se, v_sk, v_sc, v_sd, hvp_ptr, C, D, K, num_splits,
                    LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial H_e V_ek over one split of a segment's row blocks.

    Grid: (E * K, class tiles, splits). Program (env * K + k, tile, split) owns the
    (BLOCK_C, Dh) rows of its partial output (E, splits, K, C, Dh): it zeroes them,
    then adds t zh^T for each of its row blocks one Dh tile at a time. A program
    spans all of Dh so that s = V zh and cross_entropy's p . s, full contractions
    over Dh (and C), are computed once per row block and class tile.
    """
    Dh = D + HAS_BIAS
    c0 = tl.program_id(1) * BLOCK_C
    env = (tl.program_id(0) // K).to(tl.int64)  # int64: offsets into E x splits x K x C x Dh may pass 2^31
    k = tl.program_id(0) % K
    split = tl.program_id(2)
    start = tl.load(offsets_ptr + env)
    count = tl.load(offsets_ptr + env + 1) - start
    dirs_k = dir_ptr + env * v_se + k * v_sk
    inv_count = 1.0 / count.to(tl.float32)
    cols_c = c0 + tl.arange(0, BLOCK_C)
    out_k = hvp_ptr + ((env * num_splits + split) * K + k) * C * Dh

    for d0 in range(0, Dh, BLOCK_D):
        cols_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(out_k + cols_c[:, None] * Dh + cols_d[None, :], tl.zeros((BLOCK_C, BLOCK_D), tl.float32),
                 mask=(cols_c[:, None] < C) & (cols_d[None, :] < Dh))
    for block in range(split, tl.cdiv(count, BLOCK_N), num_splits):
        rows, valid = _segment_rows(order_ptr, start, count, block, BLOCK_N)
        row_max = tl.zeros((BLOCK_N,), tl.float32)
        inv_sum = tl.zeros((BLOCK_N,), tl.float32)
        p_dot_s = tl.zeros((BLOCK_N,), tl.float32)
        if LOSS == CROSS_ENTROPY:
            row_max, inv_sum = _row_softmax_scale(logit_ptr, l_sn, l_sc, rows, C, BLOCK_N, BLOCK_C)
            p_dot_s = _p_dot_apply(logit_ptr, l_sn, l_sc, row_max, inv_sum, dirs_k, v_sc, v_sd,
                                   feat_ptr, f_sn, f_sd, rows, valid, C, D, HAS_BIAS, BLOCK_N, BLOCK_C, BLOCK_D)
        p, cols, cmask = _link_tile(logit_ptr, l_sn, l_sc, rows, row_max, inv_sum, c0, C, LOSS, BLOCK_C)
        s = _apply_tile(dirs_k, v_sc, v_sd, feat_ptr, f_sn, f_sd, rows, valid, c0, C, D, False, HAS_BIAS,
                        BLOCK_N, BLOCK_C, BLOCK_D)
        t = inv_count * _hess_apply(p, s, p_dot_s, cmask, C, LOSS)
        tl.debug_barrier()  # the previous block's (or the zeroing) stores land before these reads
        for d0 in range(0, Dh, BLOCK_D):
            zh = _load_zh(feat_ptr, f_sn, f_sd, rows, valid, d0, D, HAS_BIAS, BLOCK_D)
            cols_d = d0 + tl.arange(0, BLOCK_D)
            out_ptrs = out_k + cols_c[:, None] * Dh + cols_d[None, :]
            out_mask = (cols_c[:, None] < C) & (cols_d[None, :] < Dh)
            tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + _dot(tl.trans(t), zh), mask=out_mask)


@triton.jit
def per_sample_backward_kernel(logit_ptr, l_sn, l_sc, feat_ptr, f_sn, f_sd, target_ptr, t_sn, t_sc,
                               order_ptr, offsets_ptr,
                               lam_ptr, lam_se, lam_sc, lam_sd, gam_ptr, gam_se, gam_sc, gam_sd,
                               dir_ptr, v_se, v_sk, v_sc, v_sd, up_ptr, u_se, u_sk, u_sc, u_sd,
                               dlogit_ptr, dfeat_ptr, C, D, K,
                               LOSS: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD_UP: tl.constexpr,
                               DIAG_UP: tl.constexpr, HVP_UP: tl.constexpr, SQUARE_RESIDUAL: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """d logits (N, C) and d features (N, D) for one row block of one environment (docs/design.md §2).

    Grid: (row blocks of the largest segment, E). Lam = dPsi/dG_e (`lam`), Gam =
    dPsi/dDg_e (`gam`), and per direction k: V_ek (`dir`) with upstream U_ek (`up`).
    The program first writes dp (the gradient w.r.t. p) and d features from Lam and
    Gam, adds each direction's part to its own rows, then pulls dp through the link;
    barriers order these read-after-write steps on the same rows.
    """
    Dh = D + HAS_BIAS
    env = tl.program_id(1).to(tl.int64)  # int64: env * C * Dh may pass 2^31
    start = tl.load(offsets_ptr + env)
    count = tl.load(offsets_ptr + env + 1) - start
    block = tl.program_id(0)
    if block * BLOCK_N < count:
        rows, valid = _segment_rows(order_ptr, start, count, block, BLOCK_N)
        inv_count = 1.0 / count.to(tl.float32)
        lam_e = lam_ptr + env * lam_se
        gam_e = gam_ptr + env * gam_se
        row_max = tl.zeros((BLOCK_N,), tl.float32)
        inv_sum = tl.zeros((BLOCK_N,), tl.float32)
        if LOSS == CROSS_ENTROPY:
            row_max, inv_sum = _row_softmax_scale(logit_ptr, l_sn, l_sc, rows, C, BLOCK_N, BLOCK_C)

        # dp = dr * dr/dp + dq * dq/dp with dr = Lam zh / N_e, dq = Gam (zh ⊙ zh) / N_e
        for c0 in range(0, C, BLOCK_C):
            p, cols, cmask = _link_tile(logit_ptr, l_sn, l_sc, rows, row_max, inv_sum, c0, C, LOSS, BLOCK_C)
            dp = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
            if GRAD_UP:
                dp += _residual_slope(C, LOSS) * _apply_tile(lam_e, lam_sc, lam_sd, feat_ptr, f_sn, f_sd, rows,
                                                             valid, c0, C, D, False, HAS_BIAS,
                                                             BLOCK_N, BLOCK_C, BLOCK_D)
            if DIAG_UP:
                dq = _apply_tile(gam_e, gam_sc, gam_sd, feat_ptr, f_sn, f_sd, rows, valid, c0, C, D, True,
                                 HAS_BIAS, BLOCK_N, BLOCK_C, BLOCK_D)
                if SQUARE_RESIDUAL:  # q = r ⊙ r: dr = 2 r ⊙ dq, dr/dp the residual slope
                    r_diag = _residual(p, cols, cmask, target_ptr, t_sn, t_sc, rows, C, LOSS)
                    dp += _residual_slope(C, LOSS) * 2.0 * r_diag * dq
                else:
                    dp += _curvature_slope(p, C, LOSS) * dq
            tl.store(dlogit_ptr + rows[:, None] * C + cols[None, :], dp * inv_count,
                     mask=valid[:, None] & cmask[None, :])
        # dz = (Lam^T r + 2 zh ⊙ (Gam^T q)) / N_e
        for d0 in range(0, D, BLOCK_D):
            dz = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            gam_q = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                p, cols, cmask = _link_tile(logit_ptr, l_sn, l_sc, rows, row_max, inv_sum, c0, C, LOSS, BLOCK_C)
                if GRAD_UP:
                    r = _residual(p, cols, cmask, target_ptr, t_sn, t_sc, rows, C, LOSS)
                    dz += _dot(r, _mat_tile(lam_e, lam_sc, lam_sd, c0, d0, C, Dh, BLOCK_C, BLOCK_D))
                if DIAG_UP:
                    if SQUARE_RESIDUAL:
                        r_diag = _residual(p, cols, cmask, target_ptr, t_sn, t_sc, rows, C, LOSS)
                        q = r_diag * r_diag
                    else:
                        q = _curvature(p, cmask, C, LOSS)
                    gam_q += _dot(q, _mat_tile(gam_e, gam_sc, gam_sd, c0, d0, C, Dh, BLOCK_C, BLOCK_D))
            if DIAG_UP:
                dz += 2.0 * _load_zh(feat_ptr, f_sn, f_sd, rows, valid, d0, D, HAS_BIAS, BLOCK_D) * gam_q
            cols_d = d0 + tl.arange(0, BLOCK_D)
            tl.store(dfeat_ptr + rows[:, None] * D + cols_d[None, :], dz * inv_count,
                     mask=valid[:, None] & (cols_d[None, :] < D))

        if HVP_UP:
            for k in range(0, K):
                dirs_k = dir_ptr + env * v_se + k * v_sk
                ups_k = up_ptr + env * u_se + k * u_sk
                # s = V zh, tau = U zh / N_e; cross_entropy's A needs p . s and p . tau over all classes
                p_dot_s = tl.zeros((BLOCK_N,), tl.float32)
                p_dot_tau = tl.zeros((BLOCK_N,), tl.float32)
                if LOSS == CROSS_ENTROPY:
                    p_dot_s = _p_dot_apply(logit_ptr, l_sn, l_sc, row_max, inv_sum, dirs_k, v_sc, v_sd,
                                           feat_ptr, f_sn, f_sd, rows, valid, C, D, HAS_BIAS,
                                           BLOCK_N, BLOCK_C, BLOCK_D)
                    p_dot_tau = inv_count * _p_dot_apply(logit_ptr, l_sn, l_sc, row_max, inv_sum, ups_k, u_sc, u_sd,
                                                         feat_ptr, f_sn, f_sd, rows, valid, C, D, HAS_BIAS,
                                                         BLOCK_N, BLOCK_C, BLOCK_D)
                for c0 in range(0, C, BLOCK_C):
                    p, cols, cmask = _link_tile(logit_ptr, l_sn, l_sc, rows, row_max, inv_sum, c0, C, LOSS, BLOCK_C)
                    s = _apply_tile(dirs_k, v_sc, v_sd, feat_ptr, f_sn, f_sd, rows, valid, c0, C, D, False,
                                    HAS_BIAS, BLOCK_N, BLOCK_C, BLOCK_D)
                    tau = inv_count * _apply_tile(ups_k, u_sc, u_sd, feat_ptr, f_sn, f_sd, rows, valid, c0,
                                                  C, D, False, HAS_BIAS, BLOCK_N, BLOCK_C, BLOCK_D)
                    tl.debug_barrier()  # earlier stores to these rows land before the reads below
                    if LOSS != MSE:  # mse's A does not depend on p
                        dp_ptrs = dlogit_ptr + rows[:, None] * C + cols[None, :]
                        mask = valid[:, None] & cmask[None, :]
                        dp = tl.load(dp_ptrs, mask=mask, other=0.0)
                        dp += _hess_apply_grad_p(p, s, tau, p_dot_s, p_dot_tau, C, LOSS)
                        tl.store(dp_ptrs, dp, mask=mask)
                    # dz += U^T t / N_e + V^T sig with t = A s, sig = A tau
                    t = inv_count * _hess_apply(p, s, p_dot_s, cmask, C, LOSS)
                    sig = _hess_apply(p, tau, p_dot_tau, cmask, C, LOSS)
                    for d0 in range(0, D, BLOCK_D):
                        dz = _dot(t, _mat_tile(ups_k, u_sc, u_sd, c0, d0, C, Dh, BLOCK_C, BLOCK_D))
                        dz += _dot(sig, _mat_tile(dirs_k, v_sc, v_sd, c0, d0, C, Dh, BLOCK_C, BLOCK_D))
                        cols_d = d0 + tl.arange(0, BLOCK_D)
                        dz_ptrs = dfeat_ptr + rows[:, None] * D + cols_d[None, :]
                        mask = valid[:, None] & (cols_d[None, :] < D)
                        tl.store(dz_ptrs, tl.load(dz_ptrs, mask=mask, other=0.0) + dz, mask=mask)


        # d logits = link VJP of dp (mse: the identity)
        if LOSS != MSE:
            tl.debug_barrier()
            p_dot_dp = tl.zeros((BLOCK_N,), tl.float32)
            if LOSS == CROSS_ENTROPY:
                for c0 in range(0, C, BLOCK_C):
                    p, cols, cmask = _link_tile(logit_ptr, l_sn, l_sc, rows, row_max, inv_sum, c0, C, LOSS, BLOCK_C)
                    dp = tl.load(dlogit_ptr + rows[:, None] * C + cols[None, :],
                                 mask=valid[:, None] & cmask[None, :], other=0.0)
                    p_dot_dp += tl.sum(p * dp, axis=1)
                tl.debug_barrier()
            for c0 in range(0, C, BLOCK_C):
                p, cols, cmask = _link_tile(logit_ptr, l_sn, l_sc, rows, row_max, inv_sum, c0, C, LOSS, BLOCK_C)
                dp_ptrs = dlogit_ptr + rows[:, None] * C + cols[None, :]
                mask = valid[:, None] & cmask[None, :]
                dp = tl.load(dp_ptrs, mask=mask, other=0.0)
                if LOSS == CROSS_ENTROPY:
                    da = p * (dp - p_dot_dp[:, None])
                else:
                    da = dp * p * (1.0 - p)
                tl.store(dp_ptrs, da, mask=mask)
