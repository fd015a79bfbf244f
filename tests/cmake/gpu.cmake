# GPU tests (tests/gpu): built whenever the CUDA backend is, so CI compiles them against the
# current interfaces; without a CUDA device they exit 77 and CTest reports them skipped.
# tests/gpu/run.sh runs them (and the benchmarks) on the GPU device machine.
if(ZSE_HAVE_CUDA AND ZSE_CU_SOURCES)
  add_executable(gpu_backend_test ${PROJECT_SOURCE_DIR}/tests/gpu/backend_test.c)
  target_include_directories(gpu_backend_test PRIVATE ${PROJECT_SOURCE_DIR}/tests)
  target_link_libraries(gpu_backend_test PRIVATE zse_lib)
  set_target_properties(gpu_backend_test PROPERTIES LINKER_LANGUAGE CUDA)
  add_test(NAME gpu_backend COMMAND gpu_backend_test)
  set_tests_properties(gpu_backend PROPERTIES SKIP_RETURN_CODE 77)

  file(GLOB zse_kernels_test_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/gpu/kernels_test*.cu)
  add_executable(gpu_kernels_test ${zse_kernels_test_sources})
  target_link_libraries(gpu_kernels_test PRIVATE zse_lib CUDA::cublas)
  add_test(NAME gpu_kernels COMMAND gpu_kernels_test)
  set_tests_properties(gpu_kernels PROPERTIES SKIP_RETURN_CODE 77)

  # the binary carries native code for every configured architecture (the default list
  # unless the builder chose one) and the tensor-core / overlapping-launch code in its PTX
  if(ZSE_CUDA_ARCHITECTURES_GIVEN)
    set(zse_archs_expected "${CMAKE_CUDA_ARCHITECTURES}")
  else()
    set(zse_archs_expected "${ZSE_DEFAULT_CUDA_ARCHITECTURES}")
  endif()
  add_test(NAME cuda_archs COMMAND python3 ${PROJECT_SOURCE_DIR}/tools/cuda_archs.py $<TARGET_FILE:zse>
           --expect "${zse_archs_expected}")
endif()
