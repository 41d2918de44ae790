// Portable SIMD for the CPU decode kernel: GCC vector extensions of 8 float lanes, compiled
// with -march=native (AVX2 or AVX-512 on x86, NEON on ARM) from one source.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace logquant_cpu {

constexpr int VL = 8;  // float lanes per vector
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef float vfloat __attribute__((vector_size(VL * 4)));
typedef int32_t vint __attribute__((vector_size(VL * 4)));
typedef uint32_t vuint __attribute__((vector_size(VL * 4)));
typedef uint16_t vhalfbits __attribute__((vector_size(VL * 2)));
typedef _Float16 vhalf __attribute__((vector_size(VL * 2)));
typedef float vfloat4 __attribute__((vector_size(16)));

inline vfloat splat(float x) { return vfloat{} + x; }

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum(vfloat v) {
  vfloat4 s = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  s += __builtin_shufflevector(s, s, 2, 3, 0, 1);
  s += __builtin_shufflevector(s, s, 1, 0, 3, 2);
  return s[0];
}

inline float hmax(vfloat v) {
  vfloat4 s = __builtin_shufflevector(v, v, 0, 1, 2, 3), t = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  s = s > t ? s : t;
  t = __builtin_shufflevector(s, s, 2, 3, 0, 1);
  s = s > t ? s : t;
  t = __builtin_shufflevector(s, s, 1, 0, 3, 2);
  s = s > t ? s : t;
  return s[0];
}

// VL elements of the store dtype as float32.
inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vfloat load(const at::BFloat16* p) {
  vhalfbits bits;
  std::memcpy(&bits, p, sizeof(bits));
  vuint wide = __builtin_convertvector(bits, vuint) << 16;
  vfloat v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}
inline vfloat load(const at::Half* p) {
  vhalf h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vfloat);
}

inline float half_at(const uint8_t* p) {  // one float16 (scales, zero points, outliers)
  _Float16 h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}

// VL 2-bit codes (channels c .. c+VL of one token) from their VL/4 packed bytes, as floats.
inline vfloat unpack2(const uint8_t* bytes) {
  uint16_t two;
  std::memcpy(&two, bytes, 2);
  const vuint shifts = {0, 2, 4, 6, 8, 10, 12, 14};
  vuint codes = (vuint{} + two) >> shifts & 3u;
  return __builtin_convertvector(codes, vfloat);
}

// exp(x) for x <= 0 (scores minus their running max), Cephes-style: 2^n * p(r), |rel err| < 2e-7.
inline vfloat vexp(vfloat x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  vfloat n = x * 1.44269504088896341f;
  n = __builtin_convertvector(__builtin_convertvector(n - 0.5f, vint), vfloat);  // round, for n <= 0
  vfloat r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

}  // namespace logquant_cpu
