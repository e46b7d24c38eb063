# LibTorch: Debian's 1.13 (C++17, the default) or a LibTorch 2.x, e.g. the
# one inside pip's torch wheel (-DCMAKE_PREFIX_PATH=<torch>/share/cmake;
# see DEVELOPERS.md "LibTorch 2.x"). Included from the top CMakeLists.txt
# before any target exists, so that the C++ standard chosen here applies to all.

# A CUDA build of LibTorch enables the CUDA language and copies
# CMAKE_CXX_STANDARD into CMAKE_CUDA_STANDARD for its GPU-detection try_run;
# CMake 3.25 (Debian 12) knows no nvcc flag for CUDA20, so that probe fails
# under C++20. We compile no CUDA sources, so the dialect only matters there.
if(NOT DEFINED CMAKE_CUDA_STANDARD)
  set(CMAKE_CUDA_STANDARD 17)
endif()

find_package(Torch REQUIRED)
list(GET TORCH_INCLUDE_DIRS 0 UT_TORCH_INCLUDE_DIR)
message(STATUS "LibTorch ${Torch_VERSION} (${TORCH_INSTALL_PREFIX}), "
               "C++ flags '${TORCH_CXX_FLAGS}'")

# Recent LibTorch 2.x headers '#error' below C++20 (and TorchConfig adds
# cxx_std_20 to the torch target). Build everything with the same standard,
# not only the targets that link torch, so one binary never mixes C++17 and
# C++20 translation units.
set(_ut_torch_needs_cxx20 OFF)
if(EXISTS "${UT_TORCH_INCLUDE_DIR}/ATen/ATen.h")
  file(STRINGS "${UT_TORCH_INCLUDE_DIR}/ATen/ATen.h" _ut_cxx20_error REGEX "C\\+\\+20 or later")
  if(_ut_cxx20_error)
    set(_ut_torch_needs_cxx20 ON)
  endif()
endif()
if(_ut_torch_needs_cxx20 AND CMAKE_CXX_STANDARD LESS 20)
  if(DEFINED CACHE{CMAKE_CXX_STANDARD})
    message(FATAL_ERROR "LibTorch ${Torch_VERSION} (${TORCH_INSTALL_PREFIX}) requires C++20, "
      "but CMAKE_CXX_STANDARD=${CMAKE_CXX_STANDARD} was given: reconfigure with "
      "-DCMAKE_CXX_STANDARD=20 (or without it), or point CMAKE_PREFIX_PATH at a LibTorch "
      "that builds with C++17 (Debian's libtorch-dev 1.13).")
  endif()
  message(STATUS "LibTorch ${Torch_VERSION} requires C++20: building with CMAKE_CXX_STANDARD=20")
  set(CMAKE_CXX_STANDARD 20)
endif()

# Our code and Debian's libraries (CAF, Boost, spdlog, ...) use the C++11
# std::string ABI; a LibTorch built with the old one (pre-2.7 pip wheels:
# -D_GLIBCXX_USE_CXX11_ABI=0) would link with undefined std::string symbols.
if(TORCH_CXX_FLAGS MATCHES "_GLIBCXX_USE_CXX11_ABI=0")
  message(FATAL_ERROR "LibTorch ${Torch_VERSION} (${TORCH_INSTALL_PREFIX}) uses the old "
    "libstdc++ ABI (TORCH_CXX_FLAGS='${TORCH_CXX_FLAGS}'), Debian's CAF/Boost/spdlog the "
    "new one: use a cxx11-ABI LibTorch (pip's torch >= 2.7, or a LibTorch "
    "distribution marked 'cxx11 ABI').")
endif()

# TorchConfig finds libc10 with find_library(c10 PATHS <torch>/lib), which
# searches the system directories first: with Debian's libtorch installed, a
# LibTorch 2.x elsewhere would link Debian's libc10.so next to its own. Its
# imported target `c10` names the right file (and `torch` already links it).
if(c10_LIBRARY AND TARGET c10)
  string(FIND "${c10_LIBRARY}" "${TORCH_INSTALL_PREFIX}/" _ut_c10_in_prefix)
  if(NOT _ut_c10_in_prefix EQUAL 0)
    list(REMOVE_ITEM TORCH_LIBRARIES "${c10_LIBRARY}")
    list(APPEND TORCH_LIBRARIES c10)
  endif()
endif()

# A CUDA build of LibTorch (pip's default wheel) needs the CUDA toolkit at
# configure time (TorchConfig enables CUDA and imports cudart/nvrtc from it),
# and at link time the CUDA libraries its libtorch_cuda.so was built against:
# pip's nvidia-* wheels, found at run time through its RPATH
# ($ORIGIN/../../nvidia/*/lib). GNU ld searches our own -rpath first (the
# toolkit, whose older libnccl.so.2 lacks symbols torch uses), so the wheels'
# directories are named with -rpath-link (link time only, no RPATH change).
if(EXISTS "${TORCH_INSTALL_PREFIX}/lib/libtorch_cuda.so")
  if(NOT TARGET torch_cuda OR NOT TARGET torch::cudart)
    message(FATAL_ERROR "LibTorch ${Torch_VERSION} (${TORCH_INSTALL_PREFIX}) is a CUDA build and "
      "CMake did not find the CUDA toolkit it needs (nvcc, cudart): install it (e.g. "
      "/usr/local/cuda, or set CUDAToolkit_ROOT) or use a CPU-only LibTorch build.")
  endif()
  execute_process(
    COMMAND "${CMAKE_COMMAND}" "-DLIB=${TORCH_INSTALL_PREFIX}/lib/libtorch_cuda.so"
            -P "${CMAKE_CURRENT_LIST_DIR}/torch_cuda_deps.cmake"
    ERROR_VARIABLE _ut_out RESULT_VARIABLE _ut_rc)
  string(REGEX MATCH "resolved=([^\n]*)" _ "${_ut_out}")
  set(_ut_cuda_deps "${CMAKE_MATCH_1}")
  string(REGEX MATCH "missing=([^\n]*)" _ "${_ut_out}")
  set(_ut_cuda_missing "${CMAKE_MATCH_1}")
  if(NOT _ut_rc EQUAL 0)
    message(FATAL_ERROR "cmake/torch_cuda_deps.cmake failed on ${TORCH_INSTALL_PREFIX}/lib/libtorch_cuda.so: ${_ut_out}")
  endif()
  if(_ut_cuda_missing)
    string(REPLACE ";" ", " _ut_cuda_missing "${_ut_cuda_missing}")
    message(FATAL_ERROR "LibTorch ${Torch_VERSION}: ${TORCH_INSTALL_PREFIX}/lib/libtorch_cuda.so "
      "needs ${_ut_cuda_missing}, found neither next to it (its RPATH: the nvidia-* wheels "
      "pip installs with torch, see `pip show torch`) nor in the system: reinstall torch "
      "with its dependencies (pip install torch==${Torch_VERSION}) or use a CPU LibTorch.")
  endif()
  set(_ut_cuda_dirs)
  foreach(_lib IN LISTS _ut_cuda_deps)
    get_filename_component(_dir "${_lib}" DIRECTORY)
    get_filename_component(_dir "${_dir}" REALPATH)
    list(APPEND _ut_cuda_dirs "${_dir}")
  endforeach()
  list(REMOVE_DUPLICATES _ut_cuda_dirs)
  list(JOIN _ut_cuda_dirs ":" _ut_cuda_dirs)
  set_property(TARGET torch APPEND PROPERTY INTERFACE_LINK_OPTIONS "LINKER:-rpath-link,${_ut_cuda_dirs}")
endif()

# LibTorch 2.x ships its own fmt (12.x) headers in its include directory, which
# every target linking torch sees before /usr/include; Debian's spdlog is built
# on Debian's fmt 9 and does not compile against fmt 12. A -I directory holding
# only fmt/ (a link to spdlog's fmt) wins over torch's -isystem directories.
# Call it on targets that use spdlog or fmt; a no-op with Debian's LibTorch.
function(ut_use_spdlog_fmt target)
  if(NOT EXISTS "${UT_TORCH_INCLUDE_DIR}/fmt" OR NOT TARGET fmt::fmt)
    return()
  endif()
  get_target_property(_inc fmt::fmt INTERFACE_INCLUDE_DIRECTORIES)
  list(GET _inc 0 _inc)
  if(_inc STREQUAL UT_TORCH_INCLUDE_DIR OR NOT EXISTS "${_inc}/fmt")
    return()
  endif()
  set(_dir "${CMAKE_BINARY_DIR}/spdlog_fmt")
  file(MAKE_DIRECTORY "${_dir}")
  file(CREATE_LINK "${_inc}/fmt" "${_dir}/fmt" SYMBOLIC)
  target_include_directories(${target} BEFORE PRIVATE "${_dir}")
endfunction()
