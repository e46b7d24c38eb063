# Script mode (cmake -DLIB=<libtorch_cuda.so> -P torch_cuda_deps.cmake): prints
# "resolved=<files>" and "missing=<names>" for the shared libraries LIB needs,
# searched as the dynamic loader would (its RPATH, then the system).
# Used by undertone_torch.cmake (file(GET_RUNTIME_DEPENDENCIES) is script-only).
file(GET_RUNTIME_DEPENDENCIES LIBRARIES "${LIB}"
  RESOLVED_DEPENDENCIES_VAR resolved UNRESOLVED_DEPENDENCIES_VAR missing
  PRE_EXCLUDE_REGEXES "^(libc|libm|libdl|librt|libpthread|libstdc\\+\\+|libgcc_s|ld-linux.*)\\.so"
  POST_EXCLUDE_REGEXES "^/lib" "^/usr/lib")
message("resolved=${resolved}")
message("missing=${missing}")
