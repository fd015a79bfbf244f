# zse template on a .zse file: the template and bos token stored by zse convert.
set(TMPL_OUT ${PROJECT_BINARY_DIR}/cli-tests)
add_test(NAME cli_template_zse COMMAND zse template ${TMPL_OUT}/tiny-bf16.zse
         --context ${PROJECT_SOURCE_DIR}/tests/fixtures/templates/cli_context.json)
set_tests_properties(cli_template_zse PROPERTIES FIXTURES_REQUIRED zse_bf16
  PASS_REGULAR_EXPRESSION "^<\\|begin_of_text\\|><\\|start_header_id\\|>system<\\|end_header_id\\|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<\\|eot_id\\|><\\|start_header_id\\|>user<\\|end_header_id\\|>\n\nHi<\\|eot_id\\|><\\|start_header_id\\|>assistant<\\|end_header_id\\|>\n\n$")
add_test(NAME cli_template_zse_missing COMMAND zse template ${TMPL_OUT}/no-such.zse
         --context ${PROJECT_SOURCE_DIR}/tests/fixtures/templates/cli_context.json)
set_tests_properties(cli_template_zse_missing PROPERTIES WILL_FAIL TRUE)

# every case of ../shared/chat-templates/goldens.json and tiny-qwen2's chat renders
# (skipped, exit 77, when ../shared is absent)
add_test(NAME template_shared_goldens COMMAND test_template_goldens shared)
set_tests_properties(template_shared_goldens PROPERTIES
  ENVIRONMENT "ZSE_TEST_DATA=${ZSE_TEST_FIXTURES};ZSE_SHARED=${ZSE_SHARED_DIR}"
  SKIP_RETURN_CODE 77)
