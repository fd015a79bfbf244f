# Operating zse: the install (libzse via pkg-config, zse(1), bash completion, the systemd
# unit), zse hardware / --fit, the benchmark alias, zse serve's advice for what it cannot
# serve, and zse convert of GGUF files (tests/gguf/check_gguf.py).
set(OPS ${PROJECT_BINARY_DIR}/ops-tests)
file(MAKE_DIRECTORY ${OPS})

# a staged install into a temporary prefix, used as a user would (tests/install/check_install.sh)
set(ZSE_APP_FLAGS "")
if(ZSE_SANITIZE OR ZSE_FUZZ)
  set(ZSE_APP_FLAGS "-fsanitize=address,undefined") # the library was built with them
endif()
add_test(NAME install_pkgconfig COMMAND bash ${PROJECT_SOURCE_DIR}/tests/install/check_install.sh
  ${PROJECT_BINARY_DIR} ${PROJECT_SOURCE_DIR} ${OPS}/install ${OUT}/tiny-int4.zse "${ZSE_APP_FLAGS}")
set_tests_properties(install_pkgconfig PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "[0-9]+ passed, 0 failed" FAIL_REGULAR_EXPRESSION "FAIL")

add_test(NAME cli_hardware COMMAND zse hardware)
set_tests_properties(cli_hardware PROPERTIES
  PASS_REGULAR_EXPRESSION "physical cores: +[0-9]+.*memory: +[0-9.]+ GiB.*(gpus: +none \\([^)]+|gpu 0: +[^,]+, [0-9.]+ GiB.*compute capability [0-9]+\\.[0-9]+.*driver )")
add_test(NAME cli_hardware_json COMMAND zse hardware --json)
set_tests_properties(cli_hardware_json PROPERTIES
  PASS_REGULAR_EXPRESSION "\"physical_cores\": [0-9]+.*\"gpus\": \\[")
add_test(NAME cli_hardware_fit COMMAND zse hardware --fit ${OUT}/tiny-int4.zse)
set_tests_properties(cli_hardware_fit PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "llama, 4 layers.*cpu +host memory +[0-9.]+ GiB available +resident +2048 \\(full\\) +2048 \\(full\\)")
add_test(NAME cli_info_fit_json COMMAND zse info ${OUT}/tiny-int4.zse --fit --json)
set_tests_properties(cli_info_fit_json PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "\"device\": \"cpu\".*\"fits\": true.*\"mode\": \"resident\".*\"max_ctx_kv_f16\": 2048.*\"max_ctx_kv_int8\": 2048")
add_test(NAME cli_hardware_fit_missing COMMAND zse hardware --fit ${OPS}/no-such.zse)
set_tests_properties(cli_hardware_fit_missing PROPERTIES PASS_REGULAR_EXPRESSION "no-such.zse")

add_test(NAME cli_benchmark_alias COMMAND zse benchmark --help)
set_tests_properties(cli_benchmark_alias PROPERTIES PASS_REGULAR_EXPRESSION "usage: zse bench MODEL.zse")
add_test(NAME cli_help_lists_alias COMMAND zse --help)
set_tests_properties(cli_help_lists_alias PROPERTIES PASS_REGULAR_EXPRESSION "bench .*\\(also: zse benchmark\\)")

add_test(NAME cli_serve_folder COMMAND zse serve ${FIX})
set_tests_properties(cli_serve_folder PROPERTIES
  PASS_REGULAR_EXPRESSION "is a folder; zse serves one .zse file. Convert it first:.*zse convert .*tiny-llama -o model.zse && zse serve model.zse")
add_test(NAME cli_serve_missing COMMAND zse serve ${OPS}/nothing-here.zse)
set_tests_properties(cli_serve_missing PROPERTIES PASS_REGULAR_EXPRESSION "nothing-here.zse does not exist")

# GGUF files written by the gguf Python package from the fixtures, converted and compared
# with the safetensors conversions (needs the .venv of tools/install-deps.sh)
add_test(NAME gguf_convert COMMAND sh -c
  "${ZSE_VENV_PY} -c 'import gguf, numpy' 2>/dev/null || { echo 'skip: the .venv has no gguf package (run tools/install-deps.sh)'; exit 77; }; \
   exec ${ZSE_VENV_PY} ${PROJECT_SOURCE_DIR}/tests/gguf/check_gguf.py $<TARGET_FILE:zse> ${PROJECT_SOURCE_DIR} ${OPS}/gguf")
set_tests_properties(gguf_convert PROPERTIES SKIP_RETURN_CODE 77 PASS_REGULAR_EXPRESSION "[0-9]+ passed, 0 failed"
  TIMEOUT 900)

# the Dockerfile cannot be built here (no image registry): hadolint checks it instead
add_test(NAME dockerfile_lint COMMAND sh -c
  "[ -x ${PROJECT_SOURCE_DIR}/.venv/bin/hadolint ] || { echo 'skip: no hadolint in .venv (run tools/install-deps.sh)'; exit 77; }; \
   cd ${PROJECT_SOURCE_DIR} && .venv/bin/hadolint --no-color Dockerfile && echo 'Dockerfile: hadolint clean'")
set_tests_properties(dockerfile_lint PROPERTIES SKIP_RETURN_CODE 77 PASS_REGULAR_EXPRESSION "hadolint clean")
