# Generation against Hugging Face goldens: logits and 48-token greedy continuations.
find_package(Python3 COMPONENTS Interpreter REQUIRED)
set(GOLD ${PROJECT_SOURCE_DIR}/tests/golden/check_generation.py)
set(GOLD_WORK ${PROJECT_BINARY_DIR}/golden)
set(ZSE_SHARED_QWEN ${ZSE_SHARED_DIR}/fixtures/tiny-qwen2)

function(zse_golden name fixture scheme)
  add_test(NAME ${name} COMMAND ${Python3_EXECUTABLE} ${GOLD} $<TARGET_FILE:zse> ${fixture} ${GOLD_WORK}/${name} ${scheme} ${ARGN})
  set_tests_properties(${name} PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 600)
endfunction()

zse_golden(golden_llama_f32 ${ZSE_TEST_FIXTURES}/tiny-llama f32)
zse_golden(golden_llama_bf16 ${ZSE_TEST_FIXTURES}/tiny-llama bf16)
zse_golden(golden_llama_int8 ${ZSE_TEST_FIXTURES}/tiny-llama int8 --close 16 --max-err 0.02)
zse_golden(golden_llama_int4 ${ZSE_TEST_FIXTURES}/tiny-llama int4 --close 4 --max-err 0.15)
zse_golden(golden_llama_kv_int8 ${ZSE_TEST_FIXTURES}/tiny-llama bf16 --kv int8 --close 8 --max-err 0.02)
zse_golden(golden_qwen2_f32 ${ZSE_TEST_FIXTURES}/tiny-qwen2 f32)
zse_golden(golden_qwen2_bf16 ${ZSE_TEST_FIXTURES}/tiny-qwen2 bf16)
zse_golden(golden_qwen2_int8 ${ZSE_TEST_FIXTURES}/tiny-qwen2 int8 --close 4 --max-err 0.02)
zse_golden(golden_shared_qwen2_f32 ${ZSE_SHARED_QWEN} f32)
zse_golden(golden_shared_qwen2_bf16 ${ZSE_SHARED_QWEN} bf16)

add_test(NAME cli_run_text COMMAND zse run ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse -p "def main():" -n 8 --temp 0)
set_tests_properties(cli_run_text PROPERTIES FIXTURES_REQUIRED zse_int4 PASS_REGULAR_EXPRESSION "generated [0-9]+ tokens")
add_test(NAME cli_run_bad_kv COMMAND zse run ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse -p "x" --kv-cache int3)
set_tests_properties(cli_run_bad_kv PROPERTIES PASS_REGULAR_EXPRESSION "--kv-cache takes f16 or int8")
add_test(NAME cli_run_cuda_missing COMMAND zse run ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse -p "x" --device tpu)
set_tests_properties(cli_run_cuda_missing PROPERTIES FIXTURES_REQUIRED zse_int4 PASS_REGULAR_EXPRESSION "unknown device 'tpu'")
add_test(NAME cli_bench_json COMMAND zse bench ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse --prompt-tokens 32 --gen-tokens 8 --json)
set_tests_properties(cli_bench_json PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "\"prefill_tok_s\": [0-9.]+, \"gen_tokens\": 8, \"decode_tok_s\": [0-9.]+")
# many sequences through the batching engine: every request must generate all its tokens
# (zse bench fails otherwise); the memory breakdown is printed
add_test(NAME cli_bench_concurrent COMMAND zse bench ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse --prompt-tokens 16
         --gen-tokens 4 --concurrency 1,3 --batch-prompt-tokens 20 --batch-gen-tokens 6 --json)
set_tests_properties(cli_bench_concurrent PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "\"memory_mb\": {\"weights\": [0-9.]+, \"kv_cache\": [0-9.]+.*\"sequences\": 1, \"prompt_tokens\": 20, \"shared_prefix\": 0, \"gen_tokens\": 6.*\"sequences\": 3, ")
add_test(NAME cli_bench_bad_concurrency COMMAND zse bench ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse --concurrency 8,0)
set_tests_properties(cli_bench_bad_concurrency PROPERTIES PASS_REGULAR_EXPRESSION "--concurrency takes up to 8 counts")
add_test(NAME cli_bench_short_ctx COMMAND zse bench ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse --prompt-tokens 64 --ctx 32)
set_tests_properties(cli_bench_short_ctx PROPERTIES PASS_REGULAR_EXPRESSION "--ctx 32 is shorter than")
# perplexity: a file against itself has zero KL divergence; int4 against bf16 a small positive one
add_test(NAME cli_perplexity_self COMMAND zse perplexity ${PROJECT_BINARY_DIR}/cli-tests/tiny-bf16.zse
         -f ${ZSE_TEST_FIXTURES}/eval.txt --ctx 64 --kld-base ${PROJECT_BINARY_DIR}/cli-tests/tiny-bf16.zse --json)
set_tests_properties(cli_perplexity_self PROPERTIES FIXTURES_REQUIRED zse_bf16
  PASS_REGULAR_EXPRESSION "\"perplexity\": [0-9]+\\.[0-9]+, \"kld_base\": \"[^\"]+\", \"mean_kld\": 0\\.0000000")
add_test(NAME cli_perplexity_int4 COMMAND zse perplexity ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse
         -f ${ZSE_TEST_FIXTURES}/eval.txt --ctx 64 --kld-base ${PROJECT_BINARY_DIR}/cli-tests/tiny-bf16.zse --json)
set_tests_properties(cli_perplexity_int4 PROPERTIES FIXTURES_REQUIRED "zse_bf16;zse_int4"
  PASS_REGULAR_EXPRESSION "\"mean_kld\": 0\\.00[0-9]*[1-9]")
add_test(NAME cli_perplexity_short_text COMMAND zse perplexity ${PROJECT_BINARY_DIR}/cli-tests/tiny-bf16.zse
         -f ${ZSE_TEST_FIXTURES}/tiny-llama/config.json --ctx 4096)
set_tests_properties(cli_perplexity_short_text PROPERTIES FIXTURES_REQUIRED zse_bf16
  PASS_REGULAR_EXPRESSION "fewer than one window")
# zse chat without a terminal: one message per line, /reset, end of input quits
add_test(NAME cli_chat_pipe COMMAND sh -c
  "printf 'hello\\n/reset\\nagain\\n' | $<TARGET_FILE:zse> chat ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse -n 4 --temp 0 --system 'Be brief.'")
set_tests_properties(cli_chat_pipe PROPERTIES FIXTURES_REQUIRED zse_int4)
# random-weight models for what the trained fixtures do not cover (tools/make_random_models.py):
# sliding window, explicit head_dim, linear and yarn rope scaling, untied qwen2
foreach(m mistral-window llama-headdim40 llama-rope-linear llama-rope-yarn qwen2-untied)
  zse_golden(golden_random_${m} ${ZSE_TEST_FIXTURES}/random/${m} f32)
endforeach()
# qwen3 (q/k norms, explicit head_dim) and the mixture-of-experts architectures: qwen2_moe
# (shared expert, sigmoid gate, decoder_sparse_step), qwen3_moe (renormalized top-k,
# mlp_only_layers, fused expert tensors), mixtral; bf16 files, f32 goldens
foreach(m qwen3-headdim qwen2-moe qwen3-moe mixtral)
  zse_golden(golden_random_${m} ${ZSE_TEST_FIXTURES}/random/${m} f32)
endforeach()
zse_golden(golden_random_qwen2-moe_int8 ${ZSE_TEST_FIXTURES}/random/qwen2-moe int8 --close 16 --max-err 0.05)
# zse info on a file with experts: the MoE facts and format 2.0
add_test(NAME cli_info_moe COMMAND sh -c
  "$<TARGET_FILE:zse> convert ${ZSE_TEST_FIXTURES}/random/qwen2-moe -o ${PROJECT_BINARY_DIR}/cli-tests/qwen2-moe.zse --quant int8 --force >/dev/null 2>&1 && \
   $<TARGET_FILE:zse> verify ${PROJECT_BINARY_DIR}/cli-tests/qwen2-moe.zse && $<TARGET_FILE:zse> info ${PROJECT_BINARY_DIR}/cli-tests/qwen2-moe.zse && \
   $<TARGET_FILE:zse> info ${PROJECT_BINARY_DIR}/cli-tests/qwen2-moe.zse --json")
set_tests_properties(cli_info_moe PROPERTIES FIXTURES_SETUP zse_moe
  PASS_REGULAR_EXPRESSION "OK \\(40 tensors, 8 experts,.*format: +\\.zse 2\\.0.*architecture: +qwen2_moe.*experts: +8 per layer in 1 of 3 layers, 4 active per token \\(softmax weights\\).*expert ffn: +8, shared expert 24 \\(sigmoid-gated\\).*expert bytes: +[0-9.]+ KB each.*\"experts\": {.*\"n_experts\": 8,.*\"expert_bytes\": [0-9]+,.*\"active_params\": [0-9]+")
# a flipped byte inside an expert's range: zse verify names the layer and the expert
add_test(NAME cli_verify_moe_corrupt COMMAND sh -c
  "off=$(python3 -c \"import json,struct,sys; f=open(sys.argv[1],'rb'); f.seek(24); n=struct.unpack('<Q',f.read(8))[0]; f.seek(64); b=json.loads(f.read(n))['experts'][0]; print(b['offset'] + 3 * b['stride'] + 100)\" ${PROJECT_BINARY_DIR}/cli-tests/qwen2-moe.zse) && \
   cp ${PROJECT_BINARY_DIR}/cli-tests/qwen2-moe.zse ${PROJECT_BINARY_DIR}/cli-tests/qwen2-moe-bad.zse && \
   printf 'X' | dd of=${PROJECT_BINARY_DIR}/cli-tests/qwen2-moe-bad.zse bs=1 seek=$off conv=notrunc 2>/dev/null && \
   ! $<TARGET_FILE:zse> verify ${PROJECT_BINARY_DIR}/cli-tests/qwen2-moe-bad.zse")
set_tests_properties(cli_verify_moe_corrupt PROPERTIES FIXTURES_REQUIRED zse_moe
  PASS_REGULAR_EXPRESSION "layer 1 expert 3 checksum mismatch.*1 damaged")
# LoRA adapters against PEFT (tests/fixtures/lora, tools/make_lora_fixtures.py): zse run --lora
# with each PEFT directory and its .zsa, logits within 1e-3 and greedy continuations equal
add_test(NAME golden_lora COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/golden/check_lora.py
         $<TARGET_FILE:zse> ${ZSE_TEST_FIXTURES} ${GOLD_WORK}/lora)
set_tests_properties(golden_lora PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 600)
# LoRA on the command line: zse chat --lora, and the errors of bad adapter flags
add_test(NAME cli_chat_lora COMMAND sh -c
  "printf 'hello\\n' | $<TARGET_FILE:zse> chat ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse -n 4 --temp 0 --lora ${ZSE_TEST_FIXTURES}/lora/tiny-llama/qv-rslora --lora-scale 0.5")
set_tests_properties(cli_chat_lora PROPERTIES FIXTURES_REQUIRED zse_int4)
add_test(NAME cli_run_lora_missing COMMAND zse run ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse -p "x" --lora /nonexistent/adapter)
set_tests_properties(cli_run_lora_missing PROPERTIES FIXTURES_REQUIRED zse_int4 PASS_REGULAR_EXPRESSION "--lora: .*/nonexistent/adapter: No such file")
add_test(NAME cli_run_lora_scale_alone COMMAND zse run ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse -p "x" --lora-scale 2)
set_tests_properties(cli_run_lora_scale_alone PROPERTIES PASS_REGULAR_EXPRESSION "--lora-scale needs --lora PATH")
add_test(NAME cli_run_lora_other_base COMMAND zse run ${PROJECT_BINARY_DIR}/cli-tests/tiny-int4.zse -p "x"
         --lora ${ZSE_TEST_FIXTURES}/lora/tiny-qwen2/attn-r8)
set_tests_properties(cli_run_lora_other_base PROPERTIES FIXTURES_REQUIRED zse_int4 PASS_REGULAR_EXPRESSION "trained for another base model")
add_test(NAME cli_convert_adapter_bad COMMAND zse convert-adapter ${ZSE_TEST_FIXTURES}/tiny-llama -o ${PROJECT_BINARY_DIR}/cli-tests/bad.zsa)
set_tests_properties(cli_convert_adapter_bad PROPERTIES PASS_REGULAR_EXPRESSION "has no adapter_config.json")
