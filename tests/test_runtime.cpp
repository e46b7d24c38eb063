// models/runtime.hpp: dtype "auto" resolution from the CPU's flags.
#define BOOST_TEST_MODULE test_runtime
#include <boost/test/unit_test.hpp>

#include <cstdlib>

#include "models/runtime.hpp"

using namespace undertone::models;

BOOST_AUTO_TEST_CASE(explicit_dtypes_pass_through) {
  for (const char* d : {"fp32", "bf16", "fp16"}) {
    BOOST_TEST(resolve_dtype(d, "cpu") == d);
    BOOST_TEST(resolve_dtype(d, "cuda:1") == d);
  }
}

BOOST_AUTO_TEST_CASE(auto_follows_the_device_and_cpu_flags) {
  BOOST_TEST(resolve_dtype("auto", "cuda") == "bf16");
  BOOST_TEST(resolve_dtype("auto", "cuda:0") == "bf16");
  // Independent check of the CPU flags: grep over the same file.
  const bool grep_says = std::system("grep -qw -e avx512_bf16 -e amx_bf16 /proc/cpuinfo") == 0;
  BOOST_TEST(cpu_has_fast_bf16() == grep_says);
  BOOST_TEST(resolve_dtype("auto", "cpu") == (grep_says ? "bf16" : "fp32"));
}
