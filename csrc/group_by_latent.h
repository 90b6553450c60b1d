// Grouping of a sparse code's (row, latent) entries by latent (CSC), shared by the CPU
// backward kernels. A stable counting sort: within a latent, entries stay in row-major
// order, so sums over them are in a fixed order whatever the thread count.
#pragma once
#include <cstdint>
#include <vector>

namespace sparse_sae {

struct LatentGroups {
  std::vector<int64_t> start;  // F + 1 offsets into entry
  std::vector<int64_t> entry;  // flat entry ids (row * width + j), grouped by latent
};

// `keep(e)` says whether entry e takes part (zero values carry nothing).
template <typename Keep>
LatentGroups group_by_latent(const int64_t* indices, int64_t n_entries, int64_t n_latents, Keep keep) {
  LatentGroups g;
  g.start.assign(n_latents + 1, 0);
  for (int64_t e = 0; e < n_entries; ++e)
    if (keep(e)) ++g.start[indices[e] + 1];
  for (int64_t j = 0; j < n_latents; ++j) g.start[j + 1] += g.start[j];
  g.entry.resize(g.start[n_latents]);
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t e = 0; e < n_entries; ++e)
    if (keep(e)) g.entry[fill[indices[e]]++] = e;
  return g;
}

}  // namespace sparse_sae
