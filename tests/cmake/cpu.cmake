# CPU backend: the matmul benchmark is built with the tests but is not one (its figures go
# to docs/BENCHMARKS.md; run it by hand: build/bench_matmul --help).
add_executable(bench_matmul ${PROJECT_SOURCE_DIR}/tools/bench_matmul.c)
target_link_libraries(bench_matmul PRIVATE zse_lib)
if(ZSE_HAVE_CUDA AND ZSE_CU_SOURCES)
  set_target_properties(bench_matmul PROPERTIES LINKER_LANGUAGE CUDA)
endif()
