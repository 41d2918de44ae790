// One tile of keys of the CPU decode kernel: full-precision tokens or 2-bit tokens of a page,
// folded into the running softmax of G query rows (a kv head's GQA group, or part of it).
//
// The inner loops are written for instruction-level parallelism: a dot product over the
// head dim is a chain of dependent FMAs, so scores are computed for several tokens at once
// (TOKENS x G independent accumulators), and the weighted sum of values runs several
// channel chunks at once (CHUNKS x G accumulators), each kept in registers.
#pragma once

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace logquant_cpu {

constexpr int MAX_DIM = 256;  // head dim
constexpr int MAX_TILE = 64;  // keys per online-softmax tile

struct PageLayout {  // byte offsets of one page's sections; see logquant/layout.py
  int64_t page_bytes, fp_page_tokens, block_tokens, group_size;
  int64_t key_codes, value_codes, key_scale, key_zero, value_scale, value_zero;
  int64_t key_out, key_out_values, key_out_channels;
};

// Independent accumulators per loop for G rows: about 12, within 16 vector registers.
template <int G>
constexpr int TOKENS = G <= 3 ? 4 : G == 4 ? 3 : G <= 6 ? 2 : 1;
template <int G>
constexpr int CHUNKS = G <= 3 ? 4 : G <= 6 ? 2 : 1;

// G query rows (scaled by the softmax scale) and their running softmax, float32.
template <int G>
struct Rows {
  int dim;
  float m[G], l[G];
  alignas(64) float q[G][MAX_DIM];
  alignas(64) float acc[G][MAX_DIM];
  alignas(64) float scores[G][MAX_TILE];  // a tile's scores, then its softmax weights

  // Turn scores[:, :n] into weights; rescale the accumulator to the new running max.
  void weigh(int n) {
    for (int g = 0; g < G; ++g) {
      for (int j = n; j < MAX_TILE; ++j) scores[g][j] = NEG_INF;
      vfloat top = load(scores[g]);
      for (int j = VL; j < n; j += VL) {
        const vfloat s = load(scores[g] + j);
        top = s > top ? s : top;
      }
      const float m_new = std::max(m[g], hmax(top));
      const float alpha = m[g] == NEG_INF ? 0.f : std::exp(m[g] - m_new);
      vfloat sum = {};
      for (int j = 0; j < n; j += VL) {
        vfloat p = vexp(load(scores[g] + j) - m_new);
        const vfloat lane = vfloat{0, 1, 2, 3, 4, 5, 6, 7} + static_cast<float>(j);
        p = lane < static_cast<float>(n) ? p : splat(0.f);
        store(scores[g] + j, p);
        sum += p;
      }
      l[g] = l[g] * alpha + hsum(sum);
      m[g] = m_new;
      if (alpha != 1.f) {
        for (int c = 0; c < dim; c += VL) store(acc[g] + c, load(acc[g] + c) * alpha);
      }
    }
  }
};

// scores[g][j0 + t] = sum_c q[g][c] * key_t[c] for NT tokens; `key(t, c)` loads a chunk.
template <int G, int NT, typename KeyChunk>
inline void dot_tokens(Rows<G>& r, const float (*q)[MAX_DIM], int j0, const KeyChunk& key) {
  vfloat s[NT][G] = {};
  for (int c = 0; c < r.dim; c += VL) {
    vfloat k[NT];
    for (int t = 0; t < NT; ++t) k[t] = key(j0 + t, c);
    for (int g = 0; g < G; ++g) {
      const vfloat qv = load(q[g] + c);
      for (int t = 0; t < NT; ++t) s[t][g] += qv * k[t];
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int g = 0; g < G; ++g) r.scores[g][j0 + t] = hsum(s[t][g]);
}

template <int G, typename KeyChunk>
inline void dot_all(Rows<G>& r, const float (*q)[MAX_DIM], int n, const KeyChunk& key) {
  int j = 0;
  for (; j + TOKENS<G> <= n; j += TOKENS<G>) dot_tokens<G, TOKENS<G>>(r, q, j, key);
  for (; j < n; ++j) dot_tokens<G, 1>(r, q, j, key);
}

// acc[g][c .. c + NC * VL) += sum_j weight[g][j] * value_j, `value(j, c)` loading a chunk.
template <int G, int NC, typename ValueChunk>
inline void weighted_sum(Rows<G>& r, const float (*weight)[MAX_TILE], int n, int c, const ValueChunk& value) {
  vfloat a[NC][G];
  for (int u = 0; u < NC; ++u)
    for (int g = 0; g < G; ++g) a[u][g] = load(r.acc[g] + c + u * VL);
  for (int j = 0; j < n; ++j) {
    vfloat p[G];
    for (int g = 0; g < G; ++g) p[g] = splat(weight[g][j]);
    for (int u = 0; u < NC; ++u) {
      const vfloat v = value(j, c + u * VL);
      for (int g = 0; g < G; ++g) a[u][g] += v * p[g];
    }
  }
  for (int u = 0; u < NC; ++u)
    for (int g = 0; g < G; ++g) store(r.acc[g] + c + u * VL, a[u][g]);
}

// Channels [begin, end) in chunks of NC vectors, the rest one vector at a time.
template <int G, int NC, typename ValueChunk>
inline void weighted_sum_range(Rows<G>& r, const float (*weight)[MAX_TILE], int n, int begin, int end,
                               const ValueChunk& value) {
  int c = begin;
  for (; c + NC * VL <= end; c += NC * VL) weighted_sum<G, NC>(r, weight, n, c, value);
  for (; c < end; c += VL) weighted_sum<G, 1>(r, weight, n, c, value);
}

// A tile of n full-precision tokens: keys[j] and values[j] point at one head's row.
template <int G, typename T>
void fp_tile(Rows<G>& r, const T* const* keys, const T* const* values, int n) {
  dot_all<G>(r, r.q, n, [&](int j, int c) { return load(keys[j] + c); });
  r.weigh(n);
  weighted_sum_range<G, CHUNKS<G>>(r, r.scores, n, 0, r.dim, [&](int j, int c) { return load(values[j] + c); });
}

// One tile (tokens t0 .. t0 + n) of a 2-bit page of one kv head. `qs`: q with the block's key
// scale folded in; `qz`: q . key zero point, per row.
template <int G>
void page_tile(Rows<G>& r, const float (*qs)[MAX_DIM], const float* qz, const uint8_t* page, const PageLayout& pl,
               int64_t t0, int n, int64_t kv_head, int64_t kv_heads) {
  const int64_t token_bytes = kv_heads * (r.dim / 4);  // packed codes of one token, all heads
  const uint8_t* key_codes = page + pl.key_codes + (t0 * kv_heads + kv_head) * (r.dim / 4);
  dot_all<G>(r, qs, n, [&](int j, int c) { return unpack2(key_codes + j * token_bytes + c / 4); });
  for (int j = 0; j < n; ++j)
    for (int g = 0; g < G; ++g) r.scores[g][j] += qz[g];
  for (int o = 0; o < pl.key_out; ++o) {  // 16-bit channels: the exact value replaces the 2-bit one
    const int ch = page[pl.key_out_channels + kv_head * pl.key_out + o];
    const float scale = half_at(page + pl.key_scale + 2 * (kv_head * r.dim + ch));
    const float zero = half_at(page + pl.key_zero + 2 * (kv_head * r.dim + ch));
    for (int j = 0; j < n; ++j) {
      const int64_t token_head = (t0 + j) * kv_heads + kv_head;
      const int code = key_codes[j * token_bytes + ch / 4] >> (2 * (ch % 4)) & 3;
      const float exact = half_at(page + pl.key_out_values + 2 * (token_head * pl.key_out + o));
      for (int g = 0; g < G; ++g) r.scores[g][j] += r.q[g][ch] * (exact - (code * scale + zero));
    }
  }
  r.weigh(n);
  // values: sum_j p_j (scale_jg * code_j + zero_jg) per group: coef = p * scale, zero part once
  const int64_t groups = r.dim / pl.group_size;
  const uint8_t* value_codes = page + pl.value_codes + (t0 * kv_heads + kv_head) * (r.dim / 4);
  auto codes = [&](int j, int c) { return unpack2(value_codes + j * token_bytes + c / 4); };
  alignas(64) float coef[G][MAX_TILE];
  for (int64_t grp = 0; grp < groups; ++grp) {
    float zero_sum[G] = {};
    for (int j = 0; j < n; ++j) {
      const int64_t at = 2 * (((t0 + j) * kv_heads + kv_head) * groups + grp);
      const float scale = half_at(page + pl.value_scale + at), zero = half_at(page + pl.value_zero + at);
      for (int g = 0; g < G; ++g) {
        coef[g][j] = r.scores[g][j] * scale;
        zero_sum[g] += r.scores[g][j] * zero;
      }
    }
    const int begin = static_cast<int>(grp * pl.group_size), end = static_cast<int>(begin + pl.group_size);
    for (int g = 0; g < G; ++g)
      for (int c = begin; c < end; c += VL) store(r.acc[g] + c, load(r.acc[g] + c) + zero_sum[g]);
    if (pl.group_size % (CHUNKS<G> * VL) == 0) {
      weighted_sum_range<G, CHUNKS<G>>(r, coef, n, begin, end, codes);
    } else {
      weighted_sum_range<G, 1>(r, coef, n, begin, end, codes);
    }
  }
}

}  // namespace logquant_cpu
