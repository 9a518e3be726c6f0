// The CPU twin's noise loops: the formulas of csrc/math/philox.h evaluated many groups at a time
// (AVX-512 or AVX2, chosen at run time, or the scalar loop), the same bits on every path.
#pragma once
#include <cstdint>

namespace pydiff {

// Normals of stream (seed, step) for whole groups [g0, g0 + count): 4 * count values into dst
// (element 4g + w of the stream at dst[4 (g - g0) + w]).
void normal_groups(uint64_t seed, uint32_t step, uint64_t g0, int64_t count, float* dst);

// The same with the scalar loop alone, whatever the CPU: the vector paths' oracle in the tests.
void normal_groups_scalar(uint64_t seed, uint32_t step, uint64_t g0, int64_t count, float* dst);

}  // namespace pydiff
