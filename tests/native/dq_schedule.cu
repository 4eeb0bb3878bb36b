// Host check of DqSchedule (attention/bwd_common.h), the order in which the dQ / bias-gradient
// kernels of both families visit their chunk's (n, key tile) pairs: every pair exactly once; one
// read-modify-write of a key tile's partial per group, at the group's last n; the first group's
// writes read nothing; and a partial tile that a step stages (loads one step ahead, by other
// threads than those that wrote it) was last written at least two steps earlier, so that a
// barrier lies between the write and the load. Prints the number of violations and exits
// non-zero if there is one. Built and run by tests/test_kernel_host_checks.py.
#include <cstdint>
#include <cstdio>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "attention/bwd_common.h"

template <int kGroup>
int check(int64_t n_begin, int64_t n_end, int n_blocks) {
  const jevo::DqSchedule<kGroup> schedule{n_begin, n_end, n_blocks};
  std::set<std::pair<int64_t, int>> visited;
  std::map<std::pair<int, int>, int> rmw_count;  // (group, key tile) -> read-modify-writes
  std::vector<int64_t> last_write(n_blocks, -1);  // step of the last write of each key tile
  int bad = 0;
  auto fail = [&](const char* what, int64_t step) {
    if (bad++ < 5) std::printf("kGroup %d, n %lld..%lld, %d key tiles, step %lld: %s\n", kGroup,
                               (long long)n_begin, (long long)n_end, n_blocks, (long long)step, what);
  };
  int64_t step = 0;
  for (auto st = schedule.first(); st.n0 < n_end; st = schedule.advance(st), ++step) {
    if (st.parity != (step & 1)) fail("parity is not the step's", step);
    if (!visited.insert({st.n0 + st.sub, st.nb}).second) fail("pair visited twice", step);
    if (st.n0 + st.sub >= n_end || st.sub >= st.size || st.size < 1 || st.size > kGroup) fail("out of range", step);
    if (st.sub + 1 != st.size) continue;  // the read-modify-write happens at the group's last n
    ++rmw_count[{st.group, st.nb}];
    const bool first = st.n0 == n_begin;
    if (first != (last_write[st.nb] < 0)) fail("first write of a tile misjudged", step);
    if (schedule.stages_partial(st) && last_write[st.nb] > step - 2) fail("stages a tile written a step ago", step);
    if (!first && !schedule.stages_partial(st) && schedule.staged_rmw(st)) fail("reads a tile it never staged", step);
    last_write[st.nb] = step;
  }
  if (int64_t(visited.size()) != (n_end - n_begin) * n_blocks) fail("pairs missed", step);
  for (const auto& [key, count] : rmw_count) {
    if (count != 1) fail("a tile's partial written more than once in a group", step);
  }
  return bad;
}

int main() {
  int bad = 0;
  for (int n_blocks : {1, 2, 3, 6}) {
    for (auto [b, e] : std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {0, 2}, {3, 8}, {5, 12}, {0, 47}}) {
      bad += check<1>(b, e, n_blocks) + check<2>(b, e, n_blocks) + check<3>(b, e, n_blocks);
    }
  }
  std::printf("violations: %d\n", bad);
  return bad != 0;
}
