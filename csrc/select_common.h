// Selection logic shared by the CPU and CUDA kernels: order-preserving radix keys for each
// dtype, the tie rule, and radix-select bookkeeping. Plain C++ (no torch headers) so it
// compiles into .cu files quickly and is unit-tested on the CPU build.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SAE_HD __host__ __device__ __forceinline__
#else
#define SAE_HD inline
#endif

namespace sparse_sae {

// Most entries the CUDA selection keeps in one row's shared-memory candidate buffer (k, k_aux,
// or a packed width): 8192 x 8 bytes = 64 KiB, within Ampere's and Hopper's shared memory.
// Read by Python as sparse_sae._C.max_select (in every build, CPU-only included).
constexpr int kMaxSelect = 8192;

// Candidate-buffer size for `n` selected entries of a row: the smallest power of two >= n
// (the bitonic sort works on powers of two), at least 1, at most kMaxSelect. A kernel launch
// sizes its dynamic shared memory by it, so k = 32 does not pay for 8192 slots.
SAE_HD int select_capacity(int64_t n) {
  int cap = 1;
  while (cap < n && cap < kMaxSelect) cap <<= 1;
  return cap;
}

// ---------------------------------------------------------------------------------------
// Order-preserving keys: for finite a, b: a < b  <=>  key(a) < key(b). -0.0 maps to +0.0's
// key, so equal values always have equal keys and the tie rule sees them as ties.
// ---------------------------------------------------------------------------------------
SAE_HD uint32_t ordered_key(float v) {
  if (v == 0.0f) v = 0.0f;
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

SAE_HD uint64_t ordered_key(double v) {
  if (v == 0.0) v = 0.0;
  uint64_t u;
  memcpy(&u, &v, sizeof(u));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// 16-bit floats (IEEE half and bfloat16) by their raw bits; the sign-magnitude layout is
// the same, so one mapping serves both.
SAE_HD uint16_t ordered_key_16(uint16_t bits) {
  if ((bits & 0x7fffu) == 0) bits = 0;  // -0 -> +0
  return (bits & 0x8000u) ? static_cast<uint16_t>(~bits) : static_cast<uint16_t>(bits | 0x8000u);
}

SAE_HD float float_from_key(uint32_t key) {
  uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

// Sort key of an entry in rank order (ascending sort key = descending value, then ascending
// index) for keys of at most 32 bits and indices below 2^32.
SAE_HD uint64_t rank_sort_key(uint32_t key, uint32_t index) {
  return (static_cast<uint64_t>(~key) << 32) | index;
}

// ---------------------------------------------------------------------------------------
// Tie rule: entry (v1, i1) ranks before (v2, i2) when its value is larger, or equal with a
// lower index. Top-k keeps the k entries that rank first; output is in rank order.
// ---------------------------------------------------------------------------------------
template <typename T>
SAE_HD bool ranks_before(T v1, int64_t i1, T v2, int64_t i2) {
  return v1 > v2 || (v1 == v2 && i1 < i2);
}

// ---------------------------------------------------------------------------------------
// Radix select, most significant digit first. After each digit pass over the histogram of
// the candidates (entries whose key matches `prefix` on the digits fixed so far), pick the
// digit holding the n-th largest candidate.
// ---------------------------------------------------------------------------------------
// Plain aggregate (no default member initializers), so it can live in CUDA shared memory;
// start it as {0, 0, n}.
template <typename Key>
struct RadixSelectState {
  Key prefix;         // digits fixed so far
  Key prefix_mask;    // which bits of prefix are fixed
  int64_t remaining;  // rank of the target among the candidates (1-based, from the top)
};

SAE_HD uint32_t radix_digit(uint64_t key, int shift, int bits) {
  return static_cast<uint32_t>((key >> shift) & ((uint64_t(1) << bits) - 1));
}

// Given the histogram of the current pass (`n_bins` = 2^bits counts), fixes the digit that
// holds the state's target and returns the number of candidates above that digit.
template <typename Key, typename Count>
SAE_HD int64_t radix_select_step(RadixSelectState<Key>& st, const Count* hist, int shift, int bits) {
  const int n_bins = 1 << bits;
  int64_t above = 0;
  int digit = n_bins - 1;
  for (; digit > 0; --digit) {
    if (above + static_cast<int64_t>(hist[digit]) >= st.remaining) break;
    above += static_cast<int64_t>(hist[digit]);
  }
  st.remaining -= above;
  st.prefix |= static_cast<Key>(digit) << shift;
  st.prefix_mask |= static_cast<Key>(n_bins - 1) << shift;
  return above;
}

}  // namespace sparse_sae
