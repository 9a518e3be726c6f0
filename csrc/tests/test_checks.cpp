// C++ unit tests of the native boundary's range rules (csrc/bindings/checks.h), which both
// bindings call; the Python tests (tests/test_reliability_native.py) cover the conversions.
#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <string>

#include "bindings/checks.h"
#include "tests/check.h"

using namespace pydiff;

// The message of the std::invalid_argument f throws, or "" when it throws nothing.
template <class F>
static std::string refusal(F f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

static bool has(const std::string& s, const char* part) {
  return s.find(part) != std::string::npos;
}

static void test_finite_f32() {
  CHECK(finite_f32(1.5, "alpha") == 1.5f, "a float32 value passes unchanged");
  CHECK(finite_f32(double(FLT_MAX), "alpha") == FLT_MAX, "FLT_MAX is finite");
  CHECK(finite_f32(-double(FLT_MAX), "alpha") == -FLT_MAX, "-FLT_MAX is finite");
  for (double bad :
       {1e39, -1e39, double(FLT_MAX) * (1 + 1e-15), double(INFINITY), -double(INFINITY), double(NAN)}) {
    const std::string m = refusal([&] { finite_f32(bad, "c_x"); });
    CHECK(has(m, "c_x must be finite in float32"), "%g: '%s'", bad, m.c_str());
  }
}

static void test_num_threads() {
  CHECK(checked_num_threads(0) == 0 && checked_num_threads(1) == 1 &&
            checked_num_threads(kMaxNumThreads) == kMaxNumThreads,
        "0, 1 and the cap are taken");
  for (int64_t bad : {int64_t(-1), int64_t(kMaxNumThreads) + 1, int64_t(1000000), INT64_MIN, INT64_MAX}) {
    const std::string m = refusal([&] { checked_num_threads(bad); });
    CHECK(has(m, "num_threads must be an integer in [0, 1024]"), "%lld: '%s'", (long long)bad, m.c_str());
  }
}

static void test_noise_range() {
  CHECK(refusal([] { check_noise_range(0, 0); }).empty(), "an empty draw");
  CHECK(refusal([] { check_noise_range(kMaxNoiseEnd - 4096, 4096); }).empty(),
        "a draw that ends at the limit");
  CHECK(refusal([] { check_noise_range(kMaxNoiseEnd, 0); }).empty(), "an empty draw at the limit");
  CHECK(has(refusal([] { check_noise_range(kMaxNoiseEnd - 4095, 4096); }),
            "offset + count must be at most 2**63 - 4"),
        "one past the limit");
  CHECK(has(refusal([] { check_noise_range((uint64_t(1) << 63) - 4, 4096); }), "offset + count"),
        "the issue's example (offset 2**63 - 4)");
  CHECK(has(refusal([] { check_noise_range(0, -1); }), "count must be >= 0"), "a negative count");
}

static void test_extent() {
  CHECK(refusal([] { check_extent(0, 0); }).empty() && refusal([] { check_extent(3, 5); }).empty(),
        "small extents");
  CHECK(has(refusal([] { check_extent(-1, 4); }), "batch must be >= 0"), "negative batch");
  CHECK(has(refusal([] { check_extent(4, -1); }), "n must be >= 0"), "negative n");
  CHECK(has(refusal([] { check_extent(int64_t(1) << 31, int64_t(1) << 31); }),
            "batch * n must be at most 2**60"),
        "an extent whose byte size would overflow");
}

static void test_overlap() {
  const Span a{"out", 1000, 64}, same{"x", 1000, 64}, shifted{"x", 1004, 64}, apart{"x", 1064, 64},
      empty{"x", 1000, 0};
  const Span absent{};
  CHECK(refusal([&] { check_no_partial_overlap(a, same); }).empty(), "exactly the same buffer is in place");
  CHECK(refusal([&] { check_no_partial_overlap(a, apart); }).empty(), "adjacent buffers");
  CHECK(refusal([&] { check_no_partial_overlap(a, empty); }).empty(), "an empty buffer");
  CHECK(refusal([&] { check_no_partial_overlap(a, absent); }).empty(), "an absent buffer");
  CHECK(refusal([&] { check_no_partial_overlap(a, shifted); }) == "out partially overlaps x",
        "a shifted overlap");
  CHECK(has(refusal([&] { check_no_overlap(a, same); }), "out overlaps x (they must be separate buffers)"),
        "no overlap at all: not even the same buffer");
  const Span top{"scales", UINTPTR_MAX - 8, 8}, low{"out", 0, 16};
  CHECK(refusal([&] { check_no_overlap(low, top); }).empty() &&
            refusal([&] { check_no_overlap(top, low); }).empty(),
        "no wrap-around at the top of the address space");
}

static StepParams plain_params() {
  StepParams p{};
  p.alpha = 1.0f;
  p.clip_range = 1.0f;
  p.dynamic_ratio = 0.995f;
  p.sample_max_value = 1.0f;
  return p;
}

static void test_step_params() {
  CHECK(refusal([] { validate_step_params(plain_params()); }).empty(), "the defaults are valid");
  StepParams p = plain_params();
  p.c_noise = INFINITY;
  CHECK(has(refusal([&] { validate_step_params(p); }), "c_noise must be finite"), "an infinite coefficient");
  p = plain_params();
  p.prediction_type = 3;
  CHECK(has(refusal([&] { validate_step_params(p); }), "prediction_type must be 0"),
        "an unknown prediction type");
  p = plain_params();
  p.use_clipped_eps = 2;
  CHECK(has(refusal([&] { validate_step_params(p); }), "use_clipped_eps must be 0 or 1"),
        "a flag out of range");
  p = plain_params();
  p.threshold_mode = kDynamic;
  p.dynamic_ratio = 0.0f;
  CHECK(has(refusal([&] { validate_step_params(p); }), "dynamic_thresholding_ratio must be in (0, 1]"),
        "ratio 0");
  p.dynamic_ratio = 1.0f;
  p.sample_max_value = 0.5f;
  CHECK(has(refusal([&] { validate_step_params(p); }), "sample_max_value must be >= 1"), "max value below 1");
  p = plain_params();
  p.threshold_mode = kStaticClip;
  p.clip_range = 0.0f;
  CHECK(has(refusal([&] { validate_step_params(p); }), "clip_sample_range"), "clip range 0");
}

static void test_step_buffers() {
  const StepParams p = plain_params();
  const uint64_t bytes = 2 * 8 * 4;  // B = 2, n = 8
  auto spans = [&] {
    StepSpans s;
    s.x = Span{"x", 0x10000, bytes};
    s.model_output = Span{"model_output", 0x20000, 2 * bytes};
    s.cond = Span{"model_output", 0x20000, bytes};
    s.uncond = Span{"model_output", 0x20000 + bytes, bytes};
    s.out = Span{"out", 0x30000, bytes};
    return s;
  };
  CHECK(refusal([&] { check_step(p, spans(), 2, 8); }).empty(), "separate buffers");
  StepSpans s = spans();
  s.out = s.x;
  s.out.name = "out";
  CHECK(refusal([&] { check_step(p, s, 2, 8); }).empty(), "out is x: in place");
  s = spans();
  s.scales = Span{"guidance_scale", 0x30000 + 4, 8};  // inside out
  CHECK(has(refusal([&] { check_step(p, s, 2, 8); }), "out overlaps guidance_scale"), "scales inside out");
  s = spans();
  s.scales = Span{"guidance_scale", 0x40000, 8};
  s.x0_out = Span{"x0_out", 0x40000, bytes};
  CHECK(has(refusal([&] { check_step(p, s, 2, 8); }), "x0_out overlaps guidance_scale"),
        "scales inside x0_out");
  s = spans();
  s.scales = Span{"guidance_scale", 0x40000, 8};
  s.thresholds = Span{"thresholds", 0x40000 + 4, 8};
  CHECK(has(refusal([&] { check_step(p, s, 2, 8); }), "thresholds overlaps guidance_scale"),
        "thresholds on scales");
  s = spans();
  s.x0_prev = Span{"x0_prev", 0x30000 + 4, bytes};
  CHECK(has(refusal([&] { check_step(p, s, 2, 8); }), "out partially overlaps x0_prev"), "shifted x0_prev");
  s = spans();
  s.nonfinite = Span{"nonfinite", 0x30000 + 8, 8};
  CHECK(has(refusal([&] { check_step(p, s, 2, 8); }), "nonfinite overlaps out"), "the counter inside out");
  StepParams d = plain_params();
  d.c_d = 0.5f;
  CHECK(has(refusal([&] { check_step(d, spans(), 2, 8); }), "x0_prev is required"),
        "multistep without history");
  d = plain_params();
  d.threshold_mode = kDynamic;
  CHECK(has(refusal([&] { check_step(d, spans(), 2, 0); }), "no elements per sample"),
        "dynamic, empty samples");
}

// fused_step_rows' table: each row by fused_step's rules, named by its index; the table is a buffer
// that no output may touch.
static void test_step_rows() {
  const uint64_t bytes = 3 * 8 * 4;  // B = 3, n = 8
  StepSpans s;
  s.x = Span{"x", 0x10000, bytes};
  s.model_output = Span{"model_output", 0x20000, bytes};
  s.cond = s.model_output;
  s.out = Span{"out", 0x30000, bytes};
  StepParams rows[3] = {plain_params(), plain_params(), plain_params()};
  CHECK(refusal([&] { check_step_rows(rows, s, 3, 8); }).empty(), "valid rows");
  rows[1].threshold_mode = kDynamic;
  rows[2].prediction_type = kVPrediction;
  CHECK(refusal([&] { check_step_rows(rows, s, 3, 8); }).empty(), "rows of different modes");
  rows[2].alpha = INFINITY;
  CHECK(has(refusal([&] { check_step_rows(rows, s, 3, 8); }), "params[2]: alpha must be finite in float32"),
        "a non-finite row names its index");
  rows[2] = plain_params();
  rows[1].dynamic_ratio = 1.5f;
  CHECK(has(refusal([&] { check_step_rows(rows, s, 3, 8); }), "params[1]: dynamic_thresholding_ratio"),
        "a bad ratio names its row");
  rows[1] = plain_params();
  rows[0].c_d = 0.25f;
  CHECK(has(refusal([&] { check_step_rows(rows, s, 3, 8); }), "params[0]: x0_prev is required"),
        "a multistep row needs x0_prev");
  s.x0_prev = Span{"x0_prev", 0x40000, bytes};
  CHECK(refusal([&] { check_step_rows(rows, s, 3, 8); }).empty(), "with x0_prev");
  rows[0] = plain_params();
  rows[0].threshold_mode = kDynamic;
  CHECK(has(refusal([&] { check_step_rows(rows, s, 3, 0); }), "params[0]: x has no elements per sample"),
        "dynamic rows of empty samples");
  rows[0] = plain_params();
  s.params = Span{"params", 0x30000 + 16, 3 * sizeof(StepParams)};
  CHECK(has(refusal([&] { check_step_rows(rows, s, 3, 8); }), "out overlaps params"), "the table inside out");
  s.params = Span{"params", 0x50000, 3 * sizeof(StepParams)};
  s.thresholds = Span{"thresholds", 0x50000 + 8, 12};
  CHECK(has(refusal([&] { check_step_rows(rows, s, 3, 8); }), "thresholds overlaps params"),
        "thresholds on the table");
  s.thresholds = Span{};
  s.workspace = Span{"workspace", 0x50000, 64};
  CHECK(has(refusal([&] { check_step_rows(rows, s, 3, 8); }), "workspace overlaps params"),
        "the workspace on the table");
  s.workspace = Span{};
  CHECK(refusal([&] { check_step_rows(rows, s, 3, 8); }).empty(), "a separate table");
}

int main() {
  test_finite_f32();
  test_num_threads();
  test_noise_range();
  test_extent();
  test_overlap();
  test_step_params();
  test_step_buffers();
  test_step_rows();
  if (failures) std::printf("%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
