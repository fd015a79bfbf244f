# zse api-key and zse audit on a database of their own; the pytest API suite against a real
# `zse serve` (tests/api, run by tests/api/run_api_tests.sh).
set(SRV_DB ${PROJECT_BINARY_DIR}/server-tests/cli.db)
add_test(NAME server_cli_reset COMMAND ${CMAKE_COMMAND} -E rm -rf ${PROJECT_BINARY_DIR}/server-tests)
set_tests_properties(server_cli_reset PROPERTIES FIXTURES_SETUP srv_cli_clean)

add_test(NAME server_cli_key_create COMMAND zse api-key create alice --rate-limit 30/min --db ${SRV_DB})
set_tests_properties(server_cli_key_create PROPERTIES FIXTURES_REQUIRED srv_cli_clean FIXTURES_SETUP srv_cli_key
  PASS_REGULAR_EXPRESSION "(^|\n)zse-[0-9a-f]+\n")
add_test(NAME server_cli_key_duplicate COMMAND zse api-key create alice --db ${SRV_DB})
set_tests_properties(server_cli_key_duplicate PROPERTIES FIXTURES_REQUIRED srv_cli_key
  PASS_REGULAR_EXPRESSION "a key named 'alice' exists already")
add_test(NAME server_cli_key_list COMMAND zse api-key list --db ${SRV_DB})
set_tests_properties(server_cli_key_list PROPERTIES FIXTURES_REQUIRED srv_cli_key
  PASS_REGULAR_EXPRESSION "alice +zse-[0-9a-f]+ +30/min +0 +enabled")
add_test(NAME server_cli_key_list_json COMMAND zse api-key list --json --db ${SRV_DB})
set_tests_properties(server_cli_key_list_json PROPERTIES FIXTURES_REQUIRED srv_cli_key
  PASS_REGULAR_EXPRESSION "\"rate_limit_per_min\": 30")
add_test(NAME server_cli_key_missing COMMAND zse api-key disable nobody --db ${SRV_DB})
set_tests_properties(server_cli_key_missing PROPERTIES FIXTURES_REQUIRED srv_cli_key
  PASS_REGULAR_EXPRESSION "no key named 'nobody'")
add_test(NAME server_cli_key_bad_limit COMMAND zse api-key create bob --rate-limit 5/hour --db ${SRV_DB})
set_tests_properties(server_cli_key_bad_limit PROPERTIES FIXTURES_REQUIRED srv_cli_clean
  PASS_REGULAR_EXPRESSION "a rate limit is N or N/min")
add_test(NAME server_cli_key_bad_name COMMAND zse api-key create "a b" --db ${SRV_DB})
set_tests_properties(server_cli_key_bad_name PROPERTIES FIXTURES_REQUIRED srv_cli_clean
  PASS_REGULAR_EXPRESSION "must be 1-64 characters")
add_test(NAME server_cli_key_priority COMMAND zse api-key create vip --priority -20 --db ${SRV_DB})
set_tests_properties(server_cli_key_priority PROPERTIES FIXTURES_REQUIRED srv_cli_key FIXTURES_SETUP srv_cli_vip
  PASS_REGULAR_EXPRESSION "(^|\n)zse-[0-9a-f]+\n")
add_test(NAME server_cli_key_set_priority COMMAND zse api-key set-priority vip 5 --db ${SRV_DB})
set_tests_properties(server_cli_key_set_priority PROPERTIES FIXTURES_REQUIRED srv_cli_vip FIXTURES_SETUP srv_cli_vip5
  PASS_REGULAR_EXPRESSION "set-priority 'vip' done")
add_test(NAME server_cli_key_list_priority COMMAND zse api-key list --json --db ${SRV_DB})
set_tests_properties(server_cli_key_list_priority PROPERTIES FIXTURES_REQUIRED srv_cli_vip5
  PASS_REGULAR_EXPRESSION "\"name\": \"vip\",[^}]*\"priority\": 5")
add_test(NAME server_cli_key_bad_priority COMMAND zse api-key create low --priority 1001 --db ${SRV_DB})
set_tests_properties(server_cli_key_bad_priority PROPERTIES FIXTURES_REQUIRED srv_cli_clean
  PASS_REGULAR_EXPRESSION "a priority is a whole number from -1000")
add_test(NAME server_cli_key_admin COMMAND zse api-key create boss --admin --db ${SRV_DB})
set_tests_properties(server_cli_key_admin PROPERTIES FIXTURES_REQUIRED srv_cli_key FIXTURES_SETUP srv_cli_boss
  PASS_REGULAR_EXPRESSION "created admin key 'boss'")
add_test(NAME server_cli_key_list_role COMMAND zse api-key list --db ${SRV_DB})
set_tests_properties(server_cli_key_list_role PROPERTIES FIXTURES_REQUIRED srv_cli_boss
  PASS_REGULAR_EXPRESSION "boss +zse-[0-9a-f]+ +none +0 +enabled +admin")
add_test(NAME server_cli_key_set_role COMMAND zse api-key set-role alice admin --db ${SRV_DB})
set_tests_properties(server_cli_key_set_role PROPERTIES FIXTURES_REQUIRED srv_cli_boss FIXTURES_SETUP srv_cli_role
  PASS_REGULAR_EXPRESSION "set-role 'alice' done")
add_test(NAME server_cli_key_list_role_json COMMAND zse api-key list --json --db ${SRV_DB})
set_tests_properties(server_cli_key_list_role_json PROPERTIES FIXTURES_REQUIRED srv_cli_role
  PASS_REGULAR_EXPRESSION "\"name\": \"alice\",[^}]*\"role\": \"admin\"")
add_test(NAME server_cli_key_bad_role COMMAND zse api-key set-role alice root --db ${SRV_DB})
set_tests_properties(server_cli_key_bad_role PROPERTIES FIXTURES_REQUIRED srv_cli_clean
  PASS_REGULAR_EXPRESSION "the role is admin or user, not 'root'")
add_test(NAME server_cli_audit_refused_empty COMMAND zse audit --refused --json --since 1h --db ${SRV_DB})
set_tests_properties(server_cli_audit_refused_empty PROPERTIES FIXTURES_REQUIRED srv_cli_key
  PASS_REGULAR_EXPRESSION "^\\[\\]")
add_test(NAME server_cli_audit_refused_key COMMAND zse audit --refused --key alice --db ${SRV_DB})
set_tests_properties(server_cli_audit_refused_key PROPERTIES FIXTURES_REQUIRED srv_cli_clean
  PASS_REGULAR_EXPRESSION "--key does not apply")
add_test(NAME server_cli_audit_empty COMMAND zse audit --json --since 1h --db ${SRV_DB})
set_tests_properties(server_cli_audit_empty PROPERTIES FIXTURES_REQUIRED srv_cli_key PASS_REGULAR_EXPRESSION "^\\[\\]")
add_test(NAME server_cli_audit_bad_since COMMAND zse audit --since forever --db ${SRV_DB})
set_tests_properties(server_cli_audit_bad_since PROPERTIES FIXTURES_REQUIRED srv_cli_clean
  PASS_REGULAR_EXPRESSION "--since takes a duration")

# the API suite: pytest with the openai SDK and langchain-openai against real servers
add_test(NAME api_pytest COMMAND sh ${PROJECT_SOURCE_DIR}/tests/api/run.sh)
set_tests_properties(api_pytest PROPERTIES
  ENVIRONMENT "ZSE_BIN=$<TARGET_FILE:zse>;ZSE_BUILD=${PROJECT_BINARY_DIR}"
  SKIP_RETURN_CODE 77 TIMEOUT 1200 PROCESSORS 2)
