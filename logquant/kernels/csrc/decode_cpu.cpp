// Fused decode attention over the paged KV store, on the CPU.
//
// One call per layer attends every decode sequence of a step (one new token each) over its
// cached full-precision tokens (token-level flat slots, CSR fp_ptr/fp_slots), its 2-bit pages
// (CSR packed_ptr/packed_pages) and its new token (read from the step's own K/V, never from the store,
// whose slot may still hold a token demoted in this step). The store is read in place: no
// gather copy, no dequantized tensor. Work items are (sequence, split of its keys); the number
// of splits depends only on the key count, never on the thread count, so the output is
// bitwise the same with any number of threads. An item reads each tile of tokens (or page)
// once for every kv head while it is in cache, keeps each head's GQA group together (every
// K/V byte read once), runs an online softmax in float32 per query head and writes a partial
// output and log-sum-exp; a second pass merges the splits.
//
// 2-bit keys: the per-channel scale of a block is folded into q once per page,
//   q . k = sum_c (q_c * scale_c) * code_c + sum_c q_c * zero_c,
// codes are unpacked in registers (4 per byte, low bits first). 2-bit values are per token
// and group: sum_t p_t (scale_tg * code_tc + zero_tg), the zero part summed per group.
// 16-bit key outlier channels (key_out per head and block) correct their scores in place.
//
// Vectorized with GCC vector extensions, compiled with -march=native: AVX2 here, AVX-512 or
// NEON elsewhere, from one source. Threads: at::parallel_for, i.e. torch's own OpenMP pool
// (the same libgomp that libtorch_cpu loaded), following torch.get_num_threads().

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"
#include "tiles.h"

namespace {

using namespace logquant_cpu;

constexpr int MAX_ROWS = 8;  // query rows of one pass (a wider GQA group takes several passes)

// Cached full-precision tokens slots[0:n], MAX_TILE at a time; each tile is read for every kv
// head while it is in cache (a token's row holds the K of every head, then the V of every head).
template <int G, typename T>
void attend_fp(std::vector<Rows<G>>& rows, const uint8_t* layer, const PageLayout& pl, const int32_t* slots,
               int64_t n) {
  const int64_t kv_heads = static_cast<int64_t>(rows.size()), dim = rows[0].dim;
  const int64_t token_elems = 2 * kv_heads * dim;
  auto token = [&](int64_t i) {  // token i's row
    const int64_t slot = slots[i];
    const T* page = reinterpret_cast<const T*>(layer + slot / pl.fp_page_tokens * pl.page_bytes);
    return page + slot % pl.fp_page_tokens * token_elems;
  };
  const T* base[MAX_TILE];
  const T* keys[MAX_TILE];
  const T* values[MAX_TILE];
  for (int64_t start = 0; start < n; start += MAX_TILE) {
    const int tile = static_cast<int>(std::min<int64_t>(MAX_TILE, n - start));
    for (int j = 0; j < tile; ++j) base[j] = token(start + j);
    for (int64_t i = start + MAX_TILE; i < std::min(n, start + 2 * MAX_TILE); ++i) {  // the next tile
      const char* row = reinterpret_cast<const char*>(token(i));
      for (int64_t b = 0; b < token_elems * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(row + b);
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int j = 0; j < tile; ++j) keys[j] = base[j] + h * dim, values[j] = base[j] + (kv_heads + h) * dim;
      fp_tile<G, T>(rows[h], keys, values, tile);
    }
  }
}

// 2-bit pages pages[0:n], one page at a time (all kv heads while the page is in cache), in
// tiles of MAX_TILE tokens. Per page and head: q with the key scale folded in, q . zero.
template <int G>
void attend_pages(std::vector<Rows<G>>& rows, const uint8_t* layer, const PageLayout& pl, const int32_t* pages,
                  int64_t n) {
  const int64_t kv_heads = static_cast<int64_t>(rows.size());
  const int dim = rows[0].dim;
  alignas(64) float qs[G][MAX_DIM];
  alignas(64) float scale[MAX_DIM], zero[MAX_DIM];
  float qz[G];
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* page = layer + static_cast<int64_t>(pages[i]) * pl.page_bytes;
    for (int64_t h = 0; h < kv_heads; ++h) {
      Rows<G>& r = rows[h];
      for (int c = 0; c < dim; ++c) {
        scale[c] = half_at(page + pl.key_scale + 2 * (h * dim + c));
        zero[c] = half_at(page + pl.key_zero + 2 * (h * dim + c));
      }
      for (int g = 0; g < G; ++g) {
        vfloat z = {};
        for (int c = 0; c < dim; c += VL) {
          store(qs[g] + c, load(r.q[g] + c) * load(scale + c));
          z += load(r.q[g] + c) * load(zero + c);
        }
        qz[g] = hsum(z);
      }
      for (int64_t t0 = 0; t0 < pl.block_tokens; t0 += MAX_TILE) {
        const int tile = static_cast<int>(std::min<int64_t>(MAX_TILE, pl.block_tokens - t0));
        page_tile<G>(r, qs, qz, page, pl, t0, tile, h, kv_heads);
      }
    }
  }
}

struct Batch {  // one call's arguments, as raw pointers
  const void *query, *new_key, *new_value;
  int64_t query_stride[2], key_stride[2], value_stride[2];
  const int32_t *query_rows, *fp_ptr, *fp_slots, *packed_ptr, *packed_pages, *item_ptr;
  const uint8_t* layer;
  PageLayout pl;
  int64_t heads, kv_heads, group, dim;
  float scaling;
  float* part_out;  // [items, heads, dim]
  float* part_lse;  // [items, heads]
};

inline std::pair<int64_t, int64_t> split_range(const int32_t* ptr, int64_t seq, int64_t split, int64_t splits) {
  const int64_t start = ptr[seq], end = ptr[seq + 1];
  const int64_t per = (end - start + splits - 1) / splits;
  const int64_t lo = std::min(end, start + split * per);
  return {lo, std::min(end, lo + per)};
}

// Query rows [row0, row0 + G) of every kv head's GQA group for one work item: sequence `seq`,
// split `split` of `splits`: its new token (split 0), its share of fp tokens and 2-bit pages.
template <int G, typename T>
void run_rows(const Batch& b, int64_t item, int64_t seq, int64_t split, int64_t splits, int row0) {
  std::vector<Rows<G>> rows(b.kv_heads);
  const int64_t row = b.query_rows[seq];
  for (int64_t h = 0; h < b.kv_heads; ++h) {
    Rows<G>& r = rows[h];
    r.dim = static_cast<int>(b.dim);
    for (int g = 0; g < G; ++g) {
      const int64_t head = h * b.group + row0 + g;
      const T* src = static_cast<const T*>(b.query) + row * b.query_stride[0] + head * b.query_stride[1];
      for (int c = 0; c < r.dim; c += VL) store(r.q[g] + c, load(src + c) * b.scaling);
      r.m[g] = NEG_INF, r.l[g] = 0.f;
      std::fill(r.acc[g], r.acc[g] + r.dim, 0.f);
    }
    if (split == 0) {  // the new token, read from the step tensors
      const T* key = static_cast<const T*>(b.new_key) + row * b.key_stride[0] + h * b.key_stride[1];
      const T* value = static_cast<const T*>(b.new_value) + row * b.value_stride[0] + h * b.value_stride[1];
      fp_tile<G, T>(r, &key, &value, 1);
    }
  }
  auto [fp_lo, fp_hi] = split_range(b.fp_ptr, seq, split, splits);
  attend_fp<G, T>(rows, b.layer, b.pl, b.fp_slots + fp_lo, fp_hi - fp_lo);
  auto [pg_lo, pg_hi] = split_range(b.packed_ptr, seq, split, splits);
  attend_pages<G>(rows, b.layer, b.pl, b.packed_pages + pg_lo, pg_hi - pg_lo);
  for (int64_t h = 0; h < b.kv_heads; ++h) {
    for (int g = 0; g < G; ++g) {
      const Rows<G>& r = rows[h];
      const bool any = r.l[g] > 0.f;
      const int64_t at = item * b.heads + h * b.group + row0 + g;
      b.part_lse[at] = any ? r.m[g] + std::log(r.l[g]) : NEG_INF;
      const float inv = any ? 1.f / r.l[g] : 0.f;
      for (int c = 0; c < r.dim; ++c) b.part_out[at * b.dim + c] = r.acc[g][c] * inv;
    }
  }
}

template <typename T>
void run_item(const Batch& b, int64_t item, int64_t seq, int64_t split, int64_t splits) {
  for (int row0 = 0; row0 < b.group; row0 += MAX_ROWS) {
    switch (std::min<int64_t>(MAX_ROWS, b.group - row0)) {
      case 1: run_rows<1, T>(b, item, seq, split, splits, row0); break;
      case 2: run_rows<2, T>(b, item, seq, split, splits, row0); break;
      case 3: run_rows<3, T>(b, item, seq, split, splits, row0); break;
      case 4: run_rows<4, T>(b, item, seq, split, splits, row0); break;
      case 5: run_rows<5, T>(b, item, seq, split, splits, row0); break;
      case 6: run_rows<6, T>(b, item, seq, split, splits, row0); break;
      case 7: run_rows<7, T>(b, item, seq, split, splits, row0); break;
      default: run_rows<8, T>(b, item, seq, split, splits, row0); break;
    }
  }
}

// Merge the splits of (sequence, query head) into its output row, in split order.
template <typename T>
void merge(const Batch& b, at::Tensor& out, int64_t seq, int64_t head) {
  const int64_t first = b.item_ptr[seq], splits = b.item_ptr[seq + 1] - first;
  float top = NEG_INF;
  for (int64_t k = 0; k < splits; ++k) top = std::max(top, b.part_lse[(first + k) * b.heads + head]);
  float total = 0.f, acc[MAX_DIM] = {};  // the splits' weighted sum
  for (int64_t k = 0; k < splits; ++k) {
    const float lse = b.part_lse[(first + k) * b.heads + head];
    if (lse == NEG_INF) continue;
    const float w = std::exp(lse - top);
    total += w;
    const float* part = b.part_out + ((first + k) * b.heads + head) * b.dim;
    for (int64_t c = 0; c < b.dim; ++c) acc[c] += w * part[c];
  }
  T* dst = out.data_ptr<T>() + b.query_rows[seq] * out.stride(0) + head * out.stride(1);
  for (int64_t c = 0; c < b.dim; ++c) dst[c] = static_cast<T>(total > 0.f ? acc[c] / total : 0.f);
}

template <typename T>
void run(const Batch& b, at::Tensor& out, int64_t num_seqs) {
  const int64_t num_items = b.item_ptr[num_seqs];
  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    int64_t seq = std::upper_bound(b.item_ptr, b.item_ptr + num_seqs + 1, static_cast<int32_t>(begin)) - b.item_ptr - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= b.item_ptr[seq + 1]) ++seq;
      run_item<T>(b, item, seq, item - b.item_ptr[seq], b.item_ptr[seq + 1] - b.item_ptr[seq]);
    }
  });
  at::parallel_for(0, num_seqs * b.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) merge<T>(b, out, i / b.heads, i % b.heads);
  });
}

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.dim() == 1, name, " must be contiguous int32 [n]");
}

// query [T, H, D], new_key/new_value [T, KVH, D], out [T, H, D]: D contiguous, one dtype.
// item_ptr [S + 1]: work items (splits of its keys) of sequence s are item_ptr[s]..item_ptr[s+1].
// layout: page_bytes, fp_page_tokens, block_tokens, group_size, then the section offsets
// key_codes, value_codes, key_scale, key_zero, value_scale, value_zero, key_out,
// key_out_values, key_out_channels.
void decode_attention(const at::Tensor& query, const at::Tensor& new_key, const at::Tensor& new_value,
                      const at::Tensor& query_rows, const at::Tensor& fp_ptr, const at::Tensor& fp_slots,
                      const at::Tensor& packed_ptr, const at::Tensor& packed_pages, const at::Tensor& item_ptr,
                      const at::Tensor& layer, at::Tensor out, at::IntArrayRef layout, double scaling) {
  TORCH_CHECK(query.dim() == 3 && new_key.dim() == 3 && new_value.dim() == 3 && out.dim() == 3, "3-d q, k, v, out");
  TORCH_CHECK(query.stride(2) == 1 && new_key.stride(2) == 1 && new_value.stride(2) == 1 && out.stride(2) == 1,
              "head_dim must be contiguous");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(new_key.scalar_type() == dtype && new_value.scalar_type() == dtype && out.scalar_type() == dtype,
              "q, k, v and out must share the store dtype");
  TORCH_CHECK(layer.scalar_type() == at::kByte && layer.is_contiguous(), "layer must be contiguous uint8");
  TORCH_CHECK(layout.size() == 13, "layout has 13 entries");
  for (auto* t : {&query_rows, &fp_ptr, &fp_slots, &packed_ptr, &packed_pages, &item_ptr}) check_index(*t, "index");
  const int64_t heads = query.size(1), kv_heads = new_key.size(1), dim = query.size(2), num_seqs = query_rows.size(0);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(dim % VL == 0 && dim <= MAX_DIM, "head_dim must be a multiple of ", VL, " and <= ", MAX_DIM);
  TORCH_CHECK(layout[3] % VL == 0 && dim % layout[3] == 0, "group_size must be a multiple of ", VL);
  TORCH_CHECK(fp_ptr.size(0) == num_seqs + 1 && packed_ptr.size(0) == num_seqs + 1 && item_ptr.size(0) == num_seqs + 1,
              "CSR offsets are [S + 1]");
  Batch b{};
  b.query = query.data_ptr(), b.new_key = new_key.data_ptr(), b.new_value = new_value.data_ptr();
  b.query_stride[0] = query.stride(0), b.query_stride[1] = query.stride(1);
  b.key_stride[0] = new_key.stride(0), b.key_stride[1] = new_key.stride(1);
  b.value_stride[0] = new_value.stride(0), b.value_stride[1] = new_value.stride(1);
  b.query_rows = query_rows.data_ptr<int32_t>(), b.fp_ptr = fp_ptr.data_ptr<int32_t>();
  b.fp_slots = fp_slots.data_ptr<int32_t>(), b.packed_ptr = packed_ptr.data_ptr<int32_t>();
  b.packed_pages = packed_pages.data_ptr<int32_t>(), b.item_ptr = item_ptr.data_ptr<int32_t>();
  b.layer = layer.data_ptr<uint8_t>();
  b.pl = PageLayout{layout[0], layout[1], layout[2], layout[3], layout[4],  layout[5], layout[6],
                    layout[7], layout[8], layout[9], layout[10], layout[11], layout[12]};
  b.heads = heads, b.kv_heads = kv_heads, b.group = heads / kv_heads, b.dim = dim;
  b.scaling = static_cast<float>(scaling);
  const int64_t num_items = b.item_ptr[num_seqs];
  auto part_out = at::empty({num_items, heads, dim}, query.options().dtype(at::kFloat));
  auto part_lse = at::empty({num_items, heads}, query.options().dtype(at::kFloat));
  b.part_out = part_out.data_ptr<float>(), b.part_lse = part_lse.data_ptr<float>();
  if (dtype == at::kFloat) run<float>(b, out, num_seqs);
  else if (dtype == at::kBFloat16) run<at::BFloat16>(b, out, num_seqs);
  else if (dtype == at::kHalf) run<at::Half>(b, out, num_seqs);
  else TORCH_CHECK(false, "unsupported dtype ", dtype);
}

// Store new tokens: key/value rows `rows[i]` of the step ([T, KVH, D], D contiguous) into the
// fp slot `slots[i]` of `layer` (token layout [2, KVH, D] in the store dtype). Called after
// attention: a slot may have held a token that this step demoted.
void write_tokens(const at::Tensor& new_key, const at::Tensor& new_value, const at::Tensor& rows,
                  const at::Tensor& slots, at::Tensor layer, at::IntArrayRef layout) {
  check_index(rows, "rows");
  check_index(slots, "slots");
  TORCH_CHECK(rows.size(0) == slots.size(0), "one slot per row");
  TORCH_CHECK(new_key.stride(2) == 1 && new_value.stride(2) == 1 && new_key.scalar_type() == new_value.scalar_type(),
              "k and v: head_dim contiguous, one dtype");
  TORCH_CHECK(layer.scalar_type() == at::kByte && layer.is_contiguous() && layout.size() == 13, "layer and layout");
  const int64_t kv_heads = new_key.size(1), row_bytes = new_key.size(2) * new_key.element_size();
  const int64_t page_bytes = layout[0], fp_page_tokens = layout[1], n = rows.size(0);
  const auto* row = rows.data_ptr<int32_t>();
  const auto* slot = slots.data_ptr<int32_t>();
  const auto* keys = static_cast<const uint8_t*>(new_key.data_ptr());
  const auto* values = static_cast<const uint8_t*>(new_value.data_ptr());
  const int64_t elem = new_key.element_size();
  uint8_t* base = layer.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint8_t* dst = base + slot[i] / fp_page_tokens * page_bytes + slot[i] % fp_page_tokens * 2 * kv_heads * row_bytes;
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::memcpy(dst + h * row_bytes, keys + (row[i] * new_key.stride(0) + h * new_key.stride(1)) * elem, row_bytes);
        std::memcpy(dst + (kv_heads + h) * row_bytes,
                    values + (row[i] * new_value.stride(0) + h * new_value.stride(1)) * elem, row_bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(logquant_cpu, m) {
  m.def("decode_attention(Tensor query, Tensor new_key, Tensor new_value, Tensor query_rows, Tensor fp_ptr, "
        "Tensor fp_slots, Tensor packed_ptr, Tensor packed_pages, Tensor item_ptr, Tensor layer, Tensor(a!) out, "
        "int[] layout, float scaling) -> ()");
  m.def("write_tokens(Tensor new_key, Tensor new_value, Tensor rows, Tensor slots, Tensor(a!) layer, "
        "int[] layout) -> ()");
}

TORCH_LIBRARY_IMPL(logquant_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("write_tokens", &write_tokens);
}
