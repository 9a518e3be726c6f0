// The CPU twin's selection helper: the stream compaction that gathers the values a dynamic
// threshold must choose among, on the widest instruction set this CPU has (chosen at run time).
#pragma once
#include <cstdint>

namespace pydiff {

// Writes the v[i] with v[i] > lo and !(v[i] >= hi) (so no NaN), in order, to dst and returns how
// many. dst has room for n + 16 values: the vector path stores whole vectors past the count.
int64_t compact_between(const float* v, int64_t n, float lo, float hi, float* dst);

// The same with the scalar loop alone: the vector path's oracle in the tests.
int64_t compact_between_scalar(const float* v, int64_t n, float lo, float hi, float* dst);

}  // namespace pydiff
