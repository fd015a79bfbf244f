# The command itself: --help, --version and an unknown verb.
add_test(NAME cli_help COMMAND zse --help)
set_tests_properties(cli_help PROPERTIES PASS_REGULAR_EXPRESSION "usage: zse <command>")
add_test(NAME cli_version COMMAND zse --version)
set_tests_properties(cli_version PROPERTIES PASS_REGULAR_EXPRESSION "^zse [0-9]+\\.[0-9]+")
add_test(NAME cli_unknown_verb COMMAND zse frobnicate)
set_tests_properties(cli_unknown_verb PROPERTIES WILL_FAIL TRUE)
