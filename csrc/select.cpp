// CPU selection: per row the top-k (or BatchTopK / threshold) values and indices in rank
// order (descending value, ties to the lower index), the row threshold, the fired counts and
// batch-active set, the row l1/l2 norms over the batch-active units, and the AuxK candidates.
//
// Top-k is a bounded buffer per row (TopKBuffer) in one pass that also accumulates the row's sum and sum
// of squares; the norms over A then only subtract the (usually few) inactive columns instead
// of a second full pass. BatchTopK finds the global threshold by radix select.
#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "kernels.h"
#include "select_common.h"
#include "vec.h"

namespace sparse_sae {
namespace {

template <typename T>
struct Entry {
  T v;
  int64_t i;
};

template <typename T>
struct RanksBefore {
  bool operator()(const Entry<T>& a, const Entry<T>& b) const { return ranks_before(a.v, a.i, b.v, b.i); }
};

// Keeps the k entries of a row that rank first. Entries arrive in increasing index order, so
// a newcomer equal to the worst kept entry never displaces it (ties go to the lower index).
// Candidates above the worst kept value are appended to a buffer, which is cut back to the
// best k (nth_element) when it fills up: O(1) per candidate instead of a heap update.
template <typename T>
struct TopKBuffer {
  std::vector<Entry<T>> items;
  int64_t k = 0, cap = 0;
  bool full = false;  // k entries seen: `worst` is valid
  T worst = T(0);

  void reset(int64_t k_) {
    k = k_;
    cap = std::max<int64_t>(4 * k_, 64);
    items.clear();
    items.reserve(cap);
    full = false;
  }
  inline void push(T v, int64_t i) {
    if (full) {
      if (!(v > worst)) return;
      items.push_back({v, i});
      if (static_cast<int64_t>(items.size()) >= cap) cut();
    } else if (k > 0) {
      items.push_back({v, i});
      if (static_cast<int64_t>(items.size()) == k) {
        cut();
        full = true;
      }
    }
  }
  void cut() {
    std::nth_element(items.begin(), items.begin() + (k - 1), items.end(), RanksBefore<T>());
    items.resize(k);
    worst = items[k - 1].v;
  }
  // The kept entries, best first.
  const std::vector<Entry<T>>& sorted() {
    if (static_cast<int64_t>(items.size()) > k) cut();
    std::sort(items.begin(), items.end(), RanksBefore<T>());
    return items;
  }
};

// Writes a row's ranked entries, then pads to `width` with value 0 at the lowest unselected
// indices (the reference's packing order).
template <typename T>
void write_packed(const std::vector<Entry<T>>& ranked, int64_t width, int64_t F, T* values, int64_t* indices,
                  std::vector<char>& taken) {
  const int64_t n = std::min<int64_t>(ranked.size(), width);
  for (int64_t j = 0; j < n; ++j) {
    values[j] = ranked[j].v;
    indices[j] = ranked[j].i;
  }
  if (n == width) return;
  taken.assign(F, 0);
  for (int64_t j = 0; j < n; ++j) taken[ranked[j].i] = 1;
  int64_t next = 0;
  for (int64_t j = n; j < width; ++j) {
    while (taken[next]) ++next;
    values[j] = T(0);
    indices[j] = next++;
  }
}

// AuxK candidates of one row: the k_aux largest entries among dead latents (clamped at 0),
// then, if there are fewer dead latents, zero-valued picks of the lowest live indices.
template <typename T>
void write_aux(TopKBuffer<T>& aux, const bool* dead, int64_t F, T* values, int64_t* indices) {
  const std::vector<Entry<T>>& kept = aux.sorted();
  const int64_t k_aux = aux.k;
  int64_t n = static_cast<int64_t>(kept.size());
  for (int64_t j = 0; j < n; ++j) {
    values[j] = std::max(kept[j].v, T(0));
    indices[j] = kept[j].i;
  }
  for (int64_t c = 0; n < k_aux && c < F; ++c) {
    if (!dead[c]) {
      values[n] = T(0);
      indices[n++] = c;
    }
  }
}

template <typename T>
struct RowStats {
  std::vector<double> sum, sq;  // per row, over every column
};

// One pass per row for Top-k: selection buffer, row sums and the AuxK buffer.
template <typename T>
void topk_rows(const T* h, int64_t B, int64_t F, int64_t k, T* values, int64_t* indices, const bool* dead,
               int64_t k_aux, T* aux_values, int64_t* aux_indices, RowStats<T>& stats, bool norms) {
#pragma omp parallel
  {
    TopKBuffer<T> heap, aux;
    std::vector<char> taken;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B; ++i) {
      const T* row = h + i * F;
      heap.reset(k);
      aux.reset(dead ? k_aux : 0);
      stats.sum[i] = stats.sq[i] = 0;
      if (norms) vec::row_sums(row, F, &stats.sum[i], &stats.sq[i]);
      for (int64_t j = 0; j < F; ++j) heap.push(row[j], j);
      if (dead)
        for (int64_t j = 0; j < F; ++j)
          if (dead[j]) aux.push(row[j], j);
      write_packed(heap.sorted(), k, F, values + i * k, indices + i * k, taken);
      if (dead) write_aux(aux, dead, F, aux_values + i * k_aux, aux_indices + i * k_aux);
    }
  }
}

// Sums and AuxK heaps for the packing modes, in a pass of their own.
template <typename T>
void sums_and_aux(const T* h, int64_t B, int64_t F, const bool* dead, int64_t k_aux, T* aux_values,
                  int64_t* aux_indices, RowStats<T>& stats, bool norms) {
#pragma omp parallel
  {
    TopKBuffer<T> aux;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B; ++i) {
      const T* row = h + i * F;
      aux.reset(dead ? k_aux : 0);
      stats.sum[i] = stats.sq[i] = 0;
      if (norms) vec::row_sums(row, F, &stats.sum[i], &stats.sq[i]);
      if (dead)
        for (int64_t j = 0; j < F; ++j)
          if (dead[j]) aux.push(row[j], j);
      if (dead) write_aux(aux, dead, F, aux_values + i * k_aux, aux_indices + i * k_aux);
    }
  }
}

// Histogram of the digits (key >> shift) & (2^bits - 1) of the entries' ordered keys (`key_of`),
// over the entries whose key bits from shift + bits up equal `high` (every entry when there are
// none): one pass of a batch-wide radix select.
template <typename T, typename Key, typename KeyOf>
void key_histogram(const T* h, int64_t N, KeyOf key_of, int key_bits, Key high, int shift, int bits,
                   int64_t* hist) {
  const bool every = shift + bits >= key_bits;
  const int64_t n_bins = int64_t(1) << bits;
  std::fill(hist, hist + n_bins, 0);
#pragma omp parallel
  {
    std::vector<int64_t> local(n_bins, 0);
#pragma omp for schedule(static)
    for (int64_t e = 0; e < N; ++e) {
      const Key key = key_of(h[e]);
      if (every || (key >> (shift + bits)) == high) ++local[radix_digit(key, shift, bits)];
    }
#pragma omp critical
    for (int64_t b = 0; b < n_bins; ++b) hist[b] += local[b];
  }
}

// The key of the n-th largest entry of h (flat) by radix select, and how many entries equal
// to it are selected (the lowest flat indices among them).
template <typename T, typename Key>
std::pair<Key, int64_t> batch_threshold(const T* h, int64_t N, int64_t n) {
  constexpr int kKeyBits = sizeof(Key) * 8;
  constexpr int kDigitBits = sizeof(Key) == 4 ? 11 : 16;
  constexpr int kBins = 1 << kDigitBits;
  RadixSelectState<Key> st{0, 0, n};
  std::vector<int64_t> hist(kBins);
  for (int shift = kKeyBits - kDigitBits; shift > -kDigitBits; shift -= kDigitBits) {
    const int s = std::max(shift, 0);
    const int bits = shift >= 0 ? kDigitBits : kDigitBits + shift;
    // the digits fixed so far are exactly the key bits from s + bits up
    const Key high = st.prefix_mask ? static_cast<Key>(st.prefix >> (s + bits)) : Key(0);
    key_histogram(h, N, [](T v) { return ordered_key(v); }, kKeyBits, high, s, bits, hist.data());
    radix_select_step(st, hist.data(), s, bits);
  }
  return {st.prefix, st.remaining};
}

template <typename T>
std::vector<torch::Tensor> select_impl(const torch::Tensor& h, int64_t k, const std::string& mode, int64_t width,
                                       const std::optional<torch::Tensor>& threshold,
                                       const std::optional<torch::Tensor>& dead_t, int64_t k_aux, bool norms,
                                       const std::optional<torch::Tensor>& given_cut) {
  using Key = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const int64_t B = h.size(0), F = h.size(1);
  const T* hp = h.data_ptr<T>();
  auto opts = h.options();
  auto acc = opts.dtype(std::is_same_v<T, double> ? torch::kFloat64 : torch::kFloat32);
  const bool* dead = dead_t.has_value() && k_aux > 0 ? dead_t->data_ptr<bool>() : nullptr;
  k_aux = dead ? std::min(k_aux, F) : 0;
  auto aux_values = torch::zeros({B, k_aux}, opts);
  auto aux_indices = torch::zeros({B, k_aux}, opts.dtype(torch::kInt64));
  RowStats<T> stats{std::vector<double>(B), std::vector<double>(B)};
  torch::Tensor values, indices;

  if (mode == "topk") {
    values = torch::empty({B, k}, opts);
    indices = torch::empty({B, k}, opts.dtype(torch::kInt64));
    topk_rows<T>(hp, B, F, k, values.data_ptr<T>(), indices.data_ptr<int64_t>(), dead, k_aux,
                 aux_values.data_ptr<T>(), aux_indices.data_ptr<int64_t>(), stats, norms);
  } else {
    if (dead || norms)
      sums_and_aux<T>(hp, B, F, dead, k_aux, aux_values.data_ptr<T>(), aux_indices.data_ptr<int64_t>(), stats,
                      norms);
    // which entries of each row are selected: key > cut, or key == cut for the first
    // take_eq[i] such entries of row i (ties to the lower flat index)
    std::vector<int64_t> take_eq(B, 0), count(B, 0);
    Key cut = 0;
    const T* thr = nullptr;
    if (mode == "batchtopk") {
      auto [key, n_eq] = given_cut.has_value()
                             ? std::pair<Key, int64_t>{ordered_key(static_cast<T>(given_cut->data_ptr<double>()[0])),
                                                       static_cast<int64_t>(given_cut->data_ptr<double>()[1])}
                             : batch_threshold<T, Key>(hp, B * F, B * k);
      cut = key;
      std::vector<int64_t> eq(B, 0);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < B; ++i) {
        int64_t gt = 0, e = 0;
        for (int64_t j = 0; j < F; ++j) {
          const Key kj = ordered_key(hp[i * F + j]);
          gt += kj > cut;
          e += kj == cut;
        }
        count[i] = gt;
        eq[i] = e;
      }
      for (int64_t i = 0; i < B; ++i) {
        take_eq[i] = std::min(eq[i], n_eq);
        n_eq -= take_eq[i];
        count[i] += take_eq[i];
      }
    } else {
      thr = threshold->data_ptr<T>();
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < B; ++i) {
        int64_t c = 0;
        for (int64_t j = 0; j < F; ++j) c += hp[i * F + j] > thr[j];
        count[i] = c;
      }
    }
    if (width <= 0) width = std::max<int64_t>(1, *std::max_element(count.begin(), count.end()));
    width = std::min(width, F);
    values = torch::empty({B, width}, opts);
    indices = torch::empty({B, width}, opts.dtype(torch::kInt64));
    T* vp = values.data_ptr<T>();
    int64_t* ip = indices.data_ptr<int64_t>();
#pragma omp parallel
    {
      std::vector<Entry<T>> picked;
      std::vector<char> taken;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < B; ++i) {
        const T* row = hp + i * F;
        picked.clear();
        int64_t eq_left = take_eq[i];
        for (int64_t j = 0; j < F; ++j) {
          bool sel;
          if (thr) {
            sel = row[j] > thr[j];
          } else {
            const Key kj = ordered_key(row[j]);
            sel = kj > cut || (kj == cut && eq_left-- > 0);
          }
          if (sel) picked.push_back({row[j], j});
        }
        std::sort(picked.begin(), picked.end(), RanksBefore<T>());
        write_packed(picked, width, F, vp + i * width, ip + i * width, taken);
      }
    }
  }

  // fired counts and the batch-active set, in row order (deterministic)
  const int64_t W = values.size(1);
  auto fired = torch::zeros({F}, opts.dtype(torch::kInt64));
  int64_t* fp = fired.data_ptr<int64_t>();
  const T* vp = values.data_ptr<T>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  for (int64_t e = 0; e < B * W; ++e) fp[ip[e]] += vp[e] > T(0);
  auto active = fired.gt(0);
  const bool* ap = active.data_ptr<bool>();

  // row norms over A: subtract the inactive columns from the full-row sums when they are
  // the minority, else sum the active columns directly
  std::vector<int64_t> inactive, act;
  for (int64_t j = 0; j < F; ++j) (ap[j] ? act : inactive).push_back(j);
  const bool subtract = inactive.size() <= act.size();
  const std::vector<int64_t>& cols = subtract ? inactive : act;
  if (!norms) {  // plain Top-k reads no norm: zeros, and no pass over h for them
    auto row_threshold = W > 0 ? std::get<0>(values.min(1)).clamp_min(0) : torch::zeros({B}, opts);
    return {values, indices, row_threshold, active, fired, torch::zeros({B}, acc), torch::zeros({B}, acc),
            aux_values, aux_indices};
  }
  torch::Tensor n1 = torch::empty({B}, acc), n2 = torch::empty({B}, acc);
  T* n1p = n1.data_ptr<T>();  // the accumulation dtype is T itself for float and double
  T* n2p = n2.data_ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    const T* row = hp + i * F;
    double s = 0, q = 0;
    for (int64_t j : cols) {
      s += row[j];
      q += double(row[j]) * double(row[j]);
    }
    if (subtract) {
      s = stats.sum[i] - s;
      q = std::max(stats.sq[i] - q, 0.0);
    }
    n1p[i] = static_cast<T>(s);
    n2p[i] = static_cast<T>(std::sqrt(q));
  }
  auto row_threshold = W > 0 ? std::get<0>(values.min(1)).clamp_min(0) : torch::zeros({B}, opts);
  return {values, indices, row_threshold, active, fired, n1, n2, aux_values, aux_indices};
}

}  // namespace

torch::Tensor key_histogram_cpu(const torch::Tensor& h, const torch::Tensor& high, int64_t shift, int64_t bits) {
  SAE_CHECK_CPU(h);
  SAE_CHECK_CONTIG(h);
  const int key_bits = static_cast<int>(h.element_size()) * 8;
  TORCH_CHECK(bits >= 1 && bits <= 16 && shift >= 0 && shift + bits <= key_bits,
              "key_histogram: need 1 <= bits <= 16 and shift + bits <= ", key_bits);
  TORCH_CHECK(high.device().is_cpu() && high.scalar_type() == torch::kInt64 && high.numel() == 1,
              "key_histogram: high must be one int64 on the CPU");
  const int64_t hi = high.item<int64_t>();  // the key's bit pattern (a 64-bit key may read as negative)
  auto hist = torch::empty({int64_t(1) << bits}, h.options().dtype(torch::kInt64));
  const int64_t N = h.numel();
  int64_t* out = hist.data_ptr<int64_t>();
  const int s = static_cast<int>(shift), b = static_cast<int>(bits);
  switch (h.scalar_type()) {
    case torch::kFloat:
      key_histogram(h.data_ptr<float>(), N, [](float v) { return ordered_key(v); }, 32,
                    static_cast<uint32_t>(hi), s, b, out);
      break;
    case torch::kDouble:
      key_histogram(h.data_ptr<double>(), N, [](double v) { return ordered_key(v); }, 64,
                    static_cast<uint64_t>(hi), s, b, out);
      break;
    case torch::kBFloat16:
    case torch::kHalf:
      key_histogram(reinterpret_cast<const uint16_t*>(h.data_ptr()), N,
                    [](uint16_t v) { return static_cast<uint32_t>(ordered_key_16(v)); }, 16,
                    static_cast<uint32_t>(hi), s, b, out);
      break;
    default:
      TORCH_CHECK(false, "key_histogram: h must be float32, float64, bfloat16 or float16");
  }
  return hist;
}

std::vector<torch::Tensor> select_cpu(const torch::Tensor& h, int64_t k, const std::string& mode, int64_t width,
                                      const std::optional<torch::Tensor>& threshold,
                                      const std::optional<torch::Tensor>& dead, int64_t k_aux, bool norms,
                                      const std::optional<torch::Tensor>& cut) {
  SAE_CHECK_CPU(h);
  SAE_CHECK_DIM(h, 2);
  SAE_CHECK_CONTIG(h);
  const int64_t F = h.size(1);
  TORCH_CHECK(h.size(0) > 0, "select: h is an empty batch (0 rows)");
  TORCH_CHECK(mode == "topk" || mode == "batchtopk" || mode == "threshold",
              "mode must be topk, batchtopk or threshold, got ", mode);
  if (mode != "threshold") TORCH_CHECK(k >= 1 && k <= F, "k must be in [1, ", F, "], got ", k);
  if (mode == "threshold") {
    TORCH_CHECK(threshold.has_value(), "mode threshold needs a threshold tensor");
    TORCH_CHECK(threshold->dim() == 1 && threshold->size(0) == F && threshold->is_contiguous() &&
                    threshold->scalar_type() == h.scalar_type(),
                "threshold must be a contiguous 1-D tensor of F = ", F, " entries of h's dtype");
  }
  if (dead.has_value()) {
    TORCH_CHECK(dead->scalar_type() == torch::kBool && dead->dim() == 1 && dead->size(0) == F &&
                    dead->is_contiguous(),
                "dead must be a contiguous bool tensor of F = ", F, " entries");
  }
  if (cut.has_value()) {
    TORCH_CHECK(mode == "batchtopk", "a given cut is BatchTopK's");
    TORCH_CHECK(cut->device().is_cpu() && cut->scalar_type() == torch::kFloat64 && cut->dim() == 1 &&
                    cut->size(0) == 2 && cut->is_contiguous(),
                "cut must be a contiguous float64 CPU tensor (value, ties)");
  }
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "select_cpu", [&] {
    out = select_impl<scalar_t>(h, k, mode, width, threshold, dead, k_aux, norms, cut);
  });
  return out;
}

}  // namespace sparse_sae
