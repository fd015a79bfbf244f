# zse convert --calibrate as a user runs it (docs/QUANT.md): a calibrated int4 file loads,
# verifies, says what it is, and is closer to the float model than round to nearest; a plan
# within --target-bpw; clear errors for bad input.
set(CAL ${PROJECT_BINARY_DIR}/calib-tests)
file(MAKE_DIRECTORY ${CAL})
set(CAL_LLAMA ${PROJECT_SOURCE_DIR}/tests/fixtures/tiny-llama)
set(CAL_SMALL ${PROJECT_SOURCE_DIR}/tests/fixtures/random/llama-rope-linear)
set(CAL_TEXT ${PROJECT_SOURCE_DIR}/tests/fixtures/calib.txt)

add_test(NAME cli_calib_convert COMMAND zse convert ${CAL_LLAMA} -o ${CAL}/cal.zse --calibrate ${CAL_TEXT}
  --calib-tokens 512 --force)
set_tests_properties(cli_calib_convert PROPERTIES FIXTURES_SETUP zse_calib
  PASS_REGULAR_EXPRESSION "calibrate: layers 0-3: AWQ scales, GPTQ.*wrote .*cal.zse")
add_test(NAME cli_calib_references COMMAND sh -c
  "$<TARGET_FILE:zse> convert ${CAL_LLAMA} -o ${CAL}/f32.zse --quant f32 --force && \
   $<TARGET_FILE:zse> convert ${CAL_LLAMA} -o ${CAL}/rtn.zse --quant int4 --force")
set_tests_properties(cli_calib_references PROPERTIES FIXTURES_SETUP zse_calib_refs)
add_test(NAME cli_calib_verify COMMAND zse verify ${CAL}/cal.zse)
set_tests_properties(cli_calib_verify PROPERTIES FIXTURES_REQUIRED zse_calib PASS_REGULAR_EXPRESSION "OK")
# a calibrated dense file is format 1.1 (docs/FORMAT.md §Versioning)
add_test(NAME cli_calib_info COMMAND zse info ${CAL}/cal.zse)
set_tests_properties(cli_calib_info PROPERTIES FIXTURES_REQUIRED zse_calib
  PASS_REGULAR_EXPRESSION "format: +\\.zse 1\\.1.*calibration: +awq\\+gptq on 512 tokens of calib.txt.*plan: +4\\.[0-9]+ bits/weight over 29 tensors")

# the point of it: mean KL divergence from the f32 conversion well below round to nearest's,
# on text the calibration did not see (the head of eval.txt, windows of 128)
add_test(NAME cli_calib_kld_below_rtn COMMAND sh -c
  "set -e; head -c 2000 ${PROJECT_SOURCE_DIR}/tests/fixtures/eval.txt > ${CAL}/eval-head.txt; \
   kld() { $<TARGET_FILE:zse> perplexity $1 -f ${CAL}/eval-head.txt --ctx 128 --kld-base ${CAL}/f32.zse --json \
     | sed -n 's/.*\"mean_kld\": \\([0-9.e-]*\\).*/\\1/p'; }; \
   cal=$(kld ${CAL}/cal.zse); rtn=$(kld ${CAL}/rtn.zse); echo \"calibrated $cal, round to nearest $rtn\"; \
   awk -v c=\"$cal\" -v r=\"$rtn\" 'BEGIN { exit !(c > 0 && r > 0 && c < 0.75 * r) }' && echo BELOW")
set_tests_properties(cli_calib_kld_below_rtn PROPERTIES FIXTURES_REQUIRED "zse_calib;zse_calib_refs"
  PASS_REGULAR_EXPRESSION "BELOW")

# a plan within the budget, shown by zse info
add_test(NAME cli_calib_target COMMAND sh -c
  "$<TARGET_FILE:zse> convert ${CAL_SMALL} -o ${CAL}/plan.zse --group-size 64 --calibrate ${CAL_TEXT} \
     --calib-tokens 128 --target-bpw 5 --force && $<TARGET_FILE:zse> info ${CAL}/plan.zse")
set_tests_properties(cli_calib_target PROPERTIES
  PASS_REGULAR_EXPRESSION "plan: +4\\.[0-9]+ bits/weight over 15 tensors \\(target 5; sensitivity on 128 tokens\\).*above int4 g64: blk")

# bad input: what is wrong and what to do, and no file written
add_test(NAME cli_calib_missing_text COMMAND zse convert ${CAL_SMALL} -o ${CAL}/x.zse --calibrate ${CAL}/no-such.txt)
set_tests_properties(cli_calib_missing_text PROPERTIES PASS_REGULAR_EXPRESSION "cannot read the calibration text .*no-such.txt")
add_test(NAME cli_calib_empty_text COMMAND sh -c
  ": > ${CAL}/empty.txt; $<TARGET_FILE:zse> convert ${CAL_SMALL} -o ${CAL}/x.zse --calibrate ${CAL}/empty.txt; test ! -e ${CAL}/x.zse")
set_tests_properties(cli_calib_empty_text PROPERTIES PASS_REGULAR_EXPRESSION "calibration text .*empty.txt is empty")
add_test(NAME cli_calib_target_absurd COMMAND zse convert ${CAL_SMALL} -o ${CAL}/x.zse --calibrate ${CAL_TEXT} --target-bpw 100)
set_tests_properties(cli_calib_target_absurd PROPERTIES PASS_REGULAR_EXPRESSION "--target-bpw takes a number from 2 to 16, not '100'")
add_test(NAME cli_calib_target_below_recipe COMMAND zse convert ${CAL_SMALL} -o ${CAL}/x.zse --calibrate ${CAL_TEXT} --target-bpw 3)
set_tests_properties(cli_calib_target_below_recipe PROPERTIES
  PASS_REGULAR_EXPRESSION "--target-bpw 3 is below what the int4 g128 recipe itself takes \\([0-9.]+ bits per weight")
add_test(NAME cli_calib_target_alone COMMAND zse convert ${CAL_SMALL} -o ${CAL}/x.zse --target-bpw 4.5)
set_tests_properties(cli_calib_target_alone PROPERTIES PASS_REGULAR_EXPRESSION "need --calibrate FILE")
add_test(NAME cli_calib_not_4bit COMMAND zse convert ${CAL_SMALL} -o ${CAL}/x.zse --quant int8 --calibrate ${CAL_TEXT})
set_tests_properties(cli_calib_not_4bit PROPERTIES PASS_REGULAR_EXPRESSION "use --quant int4, int4s or nf4 \\(not int8\\)")
add_test(NAME cli_calib_moe_refused COMMAND zse convert ${PROJECT_SOURCE_DIR}/tests/fixtures/random/qwen2-moe
  -o ${CAL}/x.zse --calibrate ${CAL_TEXT})
set_tests_properties(cli_calib_moe_refused PROPERTIES
  PASS_REGULAR_EXPRESSION "mixture-of-experts model \\(qwen2_moe\\): --calibrate supports dense models only")
add_test(NAME cli_calib_bad_method COMMAND zse convert ${CAL_SMALL} -o ${CAL}/x.zse --calibrate ${CAL_TEXT} --calib-method foo)
set_tests_properties(cli_calib_bad_method PROPERTIES PASS_REGULAR_EXPRESSION "--calib-method must be awq\\+gptq, gptq or awq")
