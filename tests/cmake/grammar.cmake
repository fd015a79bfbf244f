# The grammar suite: 200 generated JSON schemas (20 a grammar_sample run), regexes and choice lists sampled through
# tools/grammar_sample on the tiny-qwen2 tokenizer, every output validated in Python
# (jsonschema, re.fullmatch); unsupported keywords refused (tests/grammar).
add_test(NAME grammar_pytest COMMAND sh ${PROJECT_SOURCE_DIR}/tests/grammar/run.sh)
set_tests_properties(grammar_pytest PROPERTIES
  ENVIRONMENT "GRAMMAR_SAMPLE=$<TARGET_FILE:grammar_sample>;ZSE_TEST_DATA=${ZSE_TEST_FIXTURES}"
  TIMEOUT 900)
