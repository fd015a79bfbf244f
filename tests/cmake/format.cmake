# zse convert / info / verify as a user runs them, on the project's own fixture.
set(FIX ${PROJECT_SOURCE_DIR}/tests/fixtures/tiny-llama)
set(OUT ${PROJECT_BINARY_DIR}/cli-tests)
file(MAKE_DIRECTORY ${OUT})

add_test(NAME cli_convert_int4 COMMAND zse convert ${FIX} -o ${OUT}/tiny-int4.zse --quant int4 --group-size 64 --force)
set_tests_properties(cli_convert_int4 PROPERTIES FIXTURES_SETUP zse_int4)
add_test(NAME cli_convert_bf16 COMMAND zse convert ${FIX} -o ${OUT}/tiny-bf16.zse --quant bf16 --force)
set_tests_properties(cli_convert_bf16 PROPERTIES FIXTURES_SETUP zse_bf16)

add_test(NAME cli_info_json COMMAND zse info ${OUT}/tiny-int4.zse --json --ctx 1024)
set_tests_properties(cli_info_json PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "\"architecture\": \"llama\".*\"file_bytes\": [0-9]+.*\"n_layers\": 4.*\"vocab_size\": 2048.*\"quant\": \"int4\".*\"group_size\": 64.*\"tokenizer_type\": \"bpe-bytelevel\".*\"chat_template\": true.*\"gpu_weight_bytes\": [0-9]+")
add_test(NAME cli_info_text COMMAND zse info ${OUT}/tiny-bf16.zse)
set_tests_properties(cli_info_text PROPERTIES FIXTURES_REQUIRED zse_bf16
  PASS_REGULAR_EXPRESSION "architecture: +llama.*bf16.*chat template: +yes.*on a GPU: +weights [0-9.]+ [KMG]B in VRAM; the embedding table \\([0-9.]+ [KMG]B\\) stays in host memory")
add_test(NAME cli_verify_ok COMMAND zse verify ${OUT}/tiny-int4.zse)
set_tests_properties(cli_verify_ok PROPERTIES FIXTURES_REQUIRED zse_int4 PASS_REGULAR_EXPRESSION "OK")

add_test(NAME cli_convert_no_overwrite COMMAND zse convert ${FIX} -o ${OUT}/tiny-int4.zse)
set_tests_properties(cli_convert_no_overwrite PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "already exists; pass --force")
add_test(NAME cli_convert_missing_dir COMMAND zse convert ${OUT}/no-such-model -o ${OUT}/x.zse)
set_tests_properties(cli_convert_missing_dir PROPERTIES PASS_REGULAR_EXPRESSION "no config.json")
add_test(NAME cli_convert_bad_quant COMMAND zse convert ${FIX} -o ${OUT}/x.zse --quant int3)
set_tests_properties(cli_convert_bad_quant PROPERTIES PASS_REGULAR_EXPRESSION "unknown quantization scheme 'int3'")
add_test(NAME cli_info_not_zse COMMAND zse info ${FIX}/config.json)
set_tests_properties(cli_info_not_zse PROPERTIES PASS_REGULAR_EXPRESSION "not a .zse file")

# a flipped byte inside a tensor: verify names the tensor and fails
add_test(NAME cli_verify_corrupt COMMAND sh -c
  "cp ${OUT}/tiny-int4.zse ${OUT}/corrupt.zse && printf 'X' | dd of=${OUT}/corrupt.zse bs=1 seek=300000 conv=notrunc 2>/dev/null && ! $<TARGET_FILE:zse> verify ${OUT}/corrupt.zse")
set_tests_properties(cli_verify_corrupt PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "tensor '[a-z_.0-9]+' checksum mismatch")

# zse tokenize / detokenize on each kind of MODEL: an HF directory, a .zse, a .gguf
add_test(NAME cli_tokenize_dir COMMAND zse tokenize ${FIX} --text "def add(a, b):")
set_tests_properties(cli_tokenize_dir PROPERTIES PASS_REGULAR_EXPRESSION "^\\[457, 785, 1343, 16, 301, 1849\\]")
add_test(NAME cli_tokenize_zse COMMAND zse tokenize ${OUT}/tiny-int4.zse --text "<|eot_id|>" --special)
set_tests_properties(cli_tokenize_zse PROPERTIES FIXTURES_REQUIRED zse_int4 PASS_REGULAR_EXPRESSION "^\\[4\\]")
add_test(NAME cli_detokenize_zse COMMAND zse detokenize ${OUT}/tiny-int4.zse --ids "[457, 785, 1343, 16, 301, 1849]")
set_tests_properties(cli_detokenize_zse PROPERTIES FIXTURES_REQUIRED zse_int4 PASS_REGULAR_EXPRESSION "^def add\\(a, b\\):")
if(EXISTS ${ZSE_SHARED_DIR}/tokenizer-vectors/ggml-vocab-gpt-2.gguf)
  add_test(NAME cli_tokenize_gguf COMMAND zse tokenize ${ZSE_SHARED_DIR}/tokenizer-vectors/ggml-vocab-gpt-2.gguf --text "Hello world")
  set_tests_properties(cli_tokenize_gguf PROPERTIES PASS_REGULAR_EXPRESSION "^\\[15496, 995\\]")
endif()
add_test(NAME cli_detokenize_bad_ids COMMAND zse detokenize ${FIX} --ids "[1, \"x\"]")
set_tests_properties(cli_detokenize_bad_ids PROPERTIES PASS_REGULAR_EXPRESSION "not a token id")

# every format verb explains itself
foreach(verb convert info verify)
  add_test(NAME cli_${verb}_help COMMAND zse ${verb} --help)
  set_tests_properties(cli_${verb}_help PROPERTIES PASS_REGULAR_EXPRESSION "usage: zse ${verb}")
endforeach()
add_test(NAME cli_convert_no_args COMMAND zse convert)
set_tests_properties(cli_convert_no_args PROPERTIES WILL_FAIL TRUE)
add_test(NAME cli_convert_bad_group COMMAND zse convert ${FIX} -o ${OUT}/x.zse --group-size 48)
set_tests_properties(cli_convert_bad_group PROPERTIES PASS_REGULAR_EXPRESSION "32, 64 or 128")

# the overrides reach the file: embeddings f16, lm_head int8, a layer kept at f16
add_test(NAME cli_convert_overrides COMMAND zse convert ${FIX} -o ${OUT}/tiny-over.zse --quant nf4
  --group-size 32 --embed-quant f16 --lm-head-quant int8 --keep-fp16 "blk.0.*" --threads 2 --force)
set_tests_properties(cli_convert_overrides PROPERTIES FIXTURES_SETUP zse_over)
add_test(NAME cli_info_overrides COMMAND zse info ${OUT}/tiny-over.zse --json)
set_tests_properties(cli_info_overrides PROPERTIES FIXTURES_REQUIRED zse_over
  PASS_REGULAR_EXPRESSION "\"quant\": \"nf4\".*\"f32\": {[^}]*\"tensors\": 9,.*\"f16\": {[^}]*\"tensors\": 8,.*\"int8\": {[^}]*\"tensors\": 1,.*\"nf4\": {[^}]*\"tensors\": 21,")

# a tied qwen2: no lm_head stored, KV estimate at --ctx
add_test(NAME cli_convert_qwen2 COMMAND zse convert ${PROJECT_SOURCE_DIR}/tests/fixtures/tiny-qwen2 -o ${OUT}/qwen2-int8.zse --quant int8 --force)
set_tests_properties(cli_convert_qwen2 PROPERTIES FIXTURES_SETUP zse_qwen2)
add_test(NAME cli_info_qwen2 COMMAND zse info ${OUT}/qwen2-int8.zse --ctx 4096)
set_tests_properties(cli_info_qwen2 PROPERTIES FIXTURES_REQUIRED zse_qwen2
  PASS_REGULAR_EXPRESSION "architecture: +qwen2.*tied embeddings: yes.*quantization: +int8.*memory at ctx 4096: weights [0-9.]+ [KMG]B \\+ KV 2.1 MB \\(f16\\) or 1.3 MB \\(int8\\)")
add_test(NAME cli_verify_qwen2 COMMAND zse verify ${OUT}/qwen2-int8.zse)
set_tests_properties(cli_verify_qwen2 PROPERTIES FIXTURES_REQUIRED zse_qwen2 PASS_REGULAR_EXPRESSION "OK")

# tools/synth_model.py end to end: a custom shape in several shards, converted and verified.
# It needs numpy: the .venv's python (tools/install-deps.sh), else the system python3; the
# tests skip only when neither has it.
set(ZSE_NUMPY_PY "PY=${ZSE_VENV_PY}; $PY -c 'import numpy' 2>/dev/null || PY=python3; \
   $PY -c 'import numpy' 2>/dev/null || { echo 'skip: no numpy in .venv or python3 (run tools/install-deps.sh)'; exit 77; }")
add_test(NAME synth_model_convert COMMAND sh -c
  "${ZSE_NUMPY_PY}; \
   $PY ${PROJECT_SOURCE_DIR}/tools/synth_model.py --arch qwen2 --layers 2 --hidden 128 --ffn 256 \
     --heads 4 --kv-heads 2 --vocab 2304 --shard-gb 0.0004 --seed 7 \
     --tokenizer ${PROJECT_SOURCE_DIR}/tests/fixtures/tiny-qwen2 --out ${OUT}/synth \
     --zse ${OUT}/synth.zse --zse-bin $<TARGET_FILE:zse> --quant int8 && \
   $<TARGET_FILE:zse> verify ${OUT}/synth.zse && $<TARGET_FILE:zse> info ${OUT}/synth.zse --json")
set_tests_properties(synth_model_convert PROPERTIES SKIP_RETURN_CODE 77
  PASS_REGULAR_EXPRESSION "model-00003-of-[0-9]+.safetensors.*OK.*\"architecture\": \"qwen2\".*\"vocab_size\": 2304")
# a mixture-of-experts shape (qwen2_moe: routed experts in every layer, a gated shared expert),
# converted to int4, verified and run (numpy as above)
add_test(NAME synth_model_moe COMMAND sh -c
  "${ZSE_NUMPY_PY}; \
   $PY ${PROJECT_SOURCE_DIR}/tools/synth_model.py --arch qwen2_moe --layers 2 --hidden 128 --ffn 256 \
     --heads 4 --kv-heads 2 --vocab 2304 --experts 6 --experts-used 2 --moe-ffn 64 --shared-ffn 96 --seed 3 \
     --tokenizer ${PROJECT_SOURCE_DIR}/tests/fixtures/tiny-qwen2 --out ${OUT}/synth-moe \
     --zse ${OUT}/synth-moe.zse --zse-bin $<TARGET_FILE:zse> --quant int4 && \
   $<TARGET_FILE:zse> verify ${OUT}/synth-moe.zse && $<TARGET_FILE:zse> info ${OUT}/synth-moe.zse && \
   $<TARGET_FILE:zse> run ${OUT}/synth-moe.zse -p 'def f(x):' -n 4 --temp 0 --threads 2")
set_tests_properties(synth_model_moe PROPERTIES SKIP_RETURN_CODE 77
  PASS_REGULAR_EXPRESSION "OK.*architecture: +qwen2_moe.*experts: +6 per layer in 2 of 2 layers, 2 active.*generated 4 tokens")
