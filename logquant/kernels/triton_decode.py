"""Triton kernels: decode attention over the paged 2-bit store, one launch per layer.

`decode_partial_kernel` runs on the grid `(sequences, kv_heads, splits)`. The program for one
KV head holds all of that head's GQA query heads as the rows of a `[BLOCK_G, BLOCK_D]` tile,
so every K/V tile is loaded once and multiplied with a tensor-core dot. A sequence's keys
are its cached fp tokens (token-level flat slots, CSR `fp_ptr`/`fp_slots`), its 2-bit pages
(CSR `packed_ptr`/`packed_pages`) and its new token (read from the step's own K/V, never from the
store, whose slot may still hold a token demoted in this step). Split `k` of `n` takes the
k-th n-th of the fp tokens and of the pages; split 0 also takes the new token. 2-bit codes
are unpacked in registers (`(byte >> 2 * (d % 4)) & 3`): the key scale is per channel over
the block, so it is folded into q once per page (`q . k = (q * scale) . code + q . zero`);
values are dequantized per token in groups of `GROUP_SIZE` channels. A layout with 16-bit key
outlier channels (`KEY_OUT` per head and block) corrects those channels' scores in place. Softmax is online in
fp32 (base 2); each split writes its normalized output and log-sum-exp (`-inf` when it had
no keys) and `decode_reduce_kernel` merges the splits into the output rows.

Import this module only after `TRITON_INTERPRET` is decided: `triton.jit` reads it when the
kernels are defined (the CPU tests set it to run the kernels in Triton's interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _online_update(scores, v, m, l, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one tile (scores [G, N] in log2 units, values [N, D]) into (m, l, acc)."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _split_range(ptr, seq, split, num_splits, ALIGN: tl.constexpr):
    """This split's part [lo, hi) of the sequence's CSR range (hi <= lo: nothing)."""
    start = tl.load(ptr + seq)
    end = tl.load(ptr + seq + 1)
    per_split = ((end - start + num_splits - 1) // num_splits + ALIGN - 1) // ALIGN * ALIGN
    lo = start + split * per_split
    return lo, tl.minimum(lo + per_split, end)


@triton.jit
def _fp_tiles(
    q, m, l, acc, fp_tier, fp_slots, lo, hi, kv_head, qk_scale,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, FP_PAGE_TOKENS: tl.constexpr, PAGE_ELEMS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Cached full-precision tokens fp_slots[lo:hi], BLOCK_N at a time."""
    d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < hi
        slot = tl.load(fp_slots + n, mask=valid, other=0).to(tl.int64)
        token = (slot // FP_PAGE_TOKENS) * PAGE_ELEMS + (slot % FP_PAGE_TOKENS) * (2 * KV_HEADS * HEAD_DIM)
        at = (token + kv_head * HEAD_DIM)[:, None] + d[None, :]
        mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(fp_tier + at, mask=mask, other=0.0)
        v = tl.load(fp_tier + at + KV_HEADS * HEAD_DIM, mask=mask, other=0.0)
        scores = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m, l, acc = _online_update(scores, v, m, l, acc, DOT_DTYPE, PRECISION)
    return m, l, acc


@triton.jit
def _page_tiles(
    q, m, l, acc, codes, scales, packed_pages, lo, hi, kv_head, qk_scale,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
    PAGE_BYTES: tl.constexpr, PAGE_HALVES: tl.constexpr, KEY_CODES: tl.constexpr, VALUE_CODES: tl.constexpr,
    KEY_SCALE: tl.constexpr, KEY_ZERO: tl.constexpr, VALUE_SCALE: tl.constexpr, VALUE_ZERO: tl.constexpr,
    KEY_OUT: tl.constexpr, KEY_OUT_VALUES: tl.constexpr, KEY_OUT_CHANNELS: tl.constexpr,
    BLOCK_BT: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """2-bit pages packed_pages[lo:hi], one page (BLOCK_TOKENS tokens) at a time. With KEY_OUT
    16-bit key channels per head, each adds q[c] * (exact - dequantized) to the scores."""
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, BLOCK_BT)
    d_ok = d < HEAD_DIM
    t_ok = t < BLOCK_TOKENS
    mask = t_ok[:, None] & d_ok[None, :]
    token_head = t[:, None] * KV_HEADS + kv_head
    code_at = token_head * (HEAD_DIM // 4) + d[None, :] // 4
    shift = ((d % 4) * 2).to(tl.uint8)[None, :]
    group_at = token_head * (HEAD_DIM // GROUP_SIZE) + d[None, :] // GROUP_SIZE
    for i in range(lo, hi):
        page = tl.load(packed_pages + i).to(tl.int64)
        byte0 = page * PAGE_BYTES
        half0 = page * PAGE_HALVES + kv_head * HEAD_DIM
        k_scale = tl.load(scales + half0 + KEY_SCALE + d, mask=d_ok, other=0.0).to(tl.float32)
        k_zero = tl.load(scales + half0 + KEY_ZERO + d, mask=d_ok, other=0.0).to(tl.float32)
        k_codes = (tl.load(codes + byte0 + KEY_CODES + code_at, mask=mask, other=0) >> shift) & 3
        q_scaled = (q * k_scale[None, :]).to(DOT_DTYPE)  # the key scale, folded into q once per page
        scores = tl.dot(q_scaled, tl.trans(k_codes.to(DOT_DTYPE)), input_precision=PRECISION)
        scores = scores + tl.sum(q * k_zero[None, :], 1)[:, None]
        for j in tl.static_range(KEY_OUT):
            scores += _outlier_channel(
                q, codes, scales, byte0, half0, page * PAGE_HALVES, t, t_ok, d, kv_head, j,
                KV_HEADS, HEAD_DIM, KEY_CODES, KEY_SCALE, KEY_ZERO, KEY_OUT, KEY_OUT_VALUES, KEY_OUT_CHANNELS,
            )  # fmt: skip
        scores = tl.where(t_ok[None, :], scores * qk_scale, float("-inf"))
        v_scale = tl.load(scales + page * PAGE_HALVES + VALUE_SCALE + group_at, mask=mask, other=0.0).to(tl.float32)
        v_zero = tl.load(scales + page * PAGE_HALVES + VALUE_ZERO + group_at, mask=mask, other=0.0).to(tl.float32)
        v_codes = (tl.load(codes + byte0 + VALUE_CODES + code_at, mask=mask, other=0) >> shift) & 3
        v = v_codes.to(tl.float32) * v_scale + v_zero
        m, l, acc = _online_update(scores, v, m, l, acc, DOT_DTYPE, PRECISION)
    return m, l, acc


@triton.jit
def _outlier_channel(
    q, codes, scales, byte0, half0, page_half0, t, t_ok, d, kv_head, j,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, KEY_CODES: tl.constexpr, KEY_SCALE: tl.constexpr,
    KEY_ZERO: tl.constexpr, KEY_OUT: tl.constexpr, KEY_OUT_VALUES: tl.constexpr, KEY_OUT_CHANNELS: tl.constexpr,
):  # fmt: skip
    """Score correction [G, BLOCK_BT] for the j-th 16-bit key channel c of this head: the
    2-bit dot product counted q[c] * dequantized[c]; the stored exact value replaces it."""
    channel = tl.load(codes + byte0 + KEY_OUT_CHANNELS + kv_head * KEY_OUT + j).to(tl.int32)
    byte = tl.load(
        codes + byte0 + KEY_CODES + (t * KV_HEADS + kv_head) * (HEAD_DIM // 4) + channel // 4, mask=t_ok, other=0
    )
    code = (byte >> ((channel % 4) * 2).to(tl.uint8)) & 3  # [BLOCK_BT]
    scale = tl.load(scales + half0 + KEY_SCALE + channel).to(tl.float32)
    zero = tl.load(scales + half0 + KEY_ZERO + channel).to(tl.float32)
    exact_at = page_half0 + KEY_OUT_VALUES + (t * KV_HEADS + kv_head) * KEY_OUT + j
    exact = tl.load(scales + exact_at, mask=t_ok, other=0.0).to(tl.float32)
    q_channel = tl.sum(tl.where(d[None, :] == channel, q, 0.0), 1)  # [G]
    return q_channel[:, None] * (exact - (code.to(tl.float32) * scale + zero))[None, :]


@triton.jit
def _new_token(
    q, m, l, acc, k_ptr, v_ptr, qk_scale, KV_DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """The sequence's new token (rounded to the store dtype, as the store will hold it)."""
    d = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + d, mask=d < HEAD_DIM, other=0.0).to(KV_DTYPE).to(tl.float32)
    v = tl.load(v_ptr + d, mask=d < HEAD_DIM, other=0.0).to(KV_DTYPE).to(tl.float32)
    score = tl.sum(q * k[None, :], 1) * qk_scale
    m_new = tl.maximum(m, score)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(score - m_new)
    return m_new, l * alpha + p, acc * alpha[:, None] + p[:, None] * v[None, :]


@triton.jit
def decode_partial_kernel(
    query, new_keys, new_values, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    query_rows, fp_ptr, fp_slots, packed_ptr, packed_pages, fp_tier, codes, scales, part_out, part_lse, num_splits,
    sm_scale,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr, FP_PAGE_TOKENS: tl.constexpr, PAGE_BYTES: tl.constexpr, PAGE_ELEMS: tl.constexpr,
    PAGE_HALVES: tl.constexpr, KEY_CODES: tl.constexpr, VALUE_CODES: tl.constexpr, KEY_SCALE: tl.constexpr,
    KEY_ZERO: tl.constexpr, VALUE_SCALE: tl.constexpr, VALUE_ZERO: tl.constexpr,
    KEY_OUT: tl.constexpr, KEY_OUT_VALUES: tl.constexpr, KEY_OUT_CHANNELS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_BT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One (sequence, kv head, split): partial output [GROUP, HEAD_DIM] and its log2-sum-exp."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    query_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    row = tl.load(query_rows + seq).to(tl.int64)
    q_at = query + row * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_at, mask=query_mask, other=0.0).to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 instead of exp
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if split == 0:
        k_ptr = new_keys + row * stride_kt + kv_head * stride_kh
        v_ptr = new_values + row * stride_vt + kv_head * stride_vh
        m, l, acc = _new_token(q, m, l, acc, k_ptr, v_ptr, qk_scale, fp_tier.dtype.element_ty, HEAD_DIM, BLOCK_D)
    lo, hi = _split_range(fp_ptr, seq, split, num_splits, BLOCK_N)
    m, l, acc = _fp_tiles(
        q, m, l, acc, fp_tier, fp_slots, lo, hi, kv_head, qk_scale,
        KV_HEADS, HEAD_DIM, FP_PAGE_TOKENS, PAGE_ELEMS, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION,
    )  # fmt: skip
    lo, hi = _split_range(packed_ptr, seq, split, num_splits, 1)
    m, l, acc = _page_tiles(
        q, m, l, acc, codes, scales, packed_pages, lo, hi, kv_head, qk_scale,
        KV_HEADS, HEAD_DIM, GROUP_SIZE, BLOCK_TOKENS, PAGE_BYTES, PAGE_HALVES, KEY_CODES, VALUE_CODES,
        KEY_SCALE, KEY_ZERO, VALUE_SCALE, VALUE_ZERO, KEY_OUT, KEY_OUT_VALUES, KEY_OUT_CHANNELS,
        BLOCK_BT, BLOCK_D, DOT_DTYPE, PRECISION,
    )  # fmt: skip
    has_keys = l > 0
    part = (seq * KV_HEADS * GROUP + heads) * num_splits + split  # [S, heads, splits] row-major
    lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l, 1.0)), float("-inf"))
    tl.store(part_lse + part, lse, mask=g < GROUP)
    out = acc / tl.where(has_keys, l, 1.0)[:, None]
    tl.store(part_out + part[:, None] * HEAD_DIM + d[None, :], out, mask=query_mask)


@triton.jit
def decode_reduce_kernel(
    part_out, part_lse, out, query_rows, stride_ot, stride_oh, num_splits,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): merge the splits by their log2-sum-exp into its output row."""
    seq, head = tl.program_id(0), tl.program_id(1)
    s, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    part = (seq * HEADS + head) * num_splits + s
    lse = tl.load(part_lse + part, mask=s < num_splits, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # empty splits (-inf) weigh 0
    mask = (s < num_splits)[:, None] & (d < HEAD_DIM)[None, :]
    partial = tl.load(part_out + part[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    result = tl.sum(weight[:, None] * partial, 0) / tl.sum(weight, 0)
    row = tl.load(query_rows + seq).to(tl.int64)
    tl.store(out + row * stride_ot + head * stride_oh + d, result.to(out.dtype.element_ty), mask=d < HEAD_DIM)
