# A short libFuzzer pass over every parser of untrusted bytes (clang build in its own tree).
add_test(NAME fuzz_smoke COMMAND ${PROJECT_SOURCE_DIR}/tools/fuzz-smoke.sh
         ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR}/fuzz 15)
set_tests_properties(fuzz_smoke PROPERTIES TIMEOUT 900 RUN_SERIAL TRUE)
