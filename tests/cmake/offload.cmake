# Weights in host memory on the CPU backend, through the CLI (the knobs force the offload
# paths a GPU takes when --gpu-memory is short): greedy ids equal to the resident model's,
# bench's placement and per-step counters, zse info --gpu-memory, bad knobs and budgets.
set(OFF ${PROJECT_BINARY_DIR}/cli-tests)
set(ZSE $<TARGET_FILE:zse>)

# a dense model with 3 of 4 layers streamed through 2 buffers, and through 1
add_test(NAME cli_offload_stream_ids COMMAND sh -c
  "a=$(${ZSE} run ${OFF}/tiny-int4.zse -p 'def main():' -n 12 --temp 0 --ids --device cpu 2>/dev/null) && \
   b=$(ZSE_STREAM_LAYERS=3 ${ZSE} run ${OFF}/tiny-int4.zse -p 'def main():' -n 12 --temp 0 --ids --device cpu 2>/dev/null) && \
   c=$(ZSE_STREAM_LAYERS=4 ZSE_STREAM_BUFFERS=1 ${ZSE} run ${OFF}/tiny-int4.zse -p 'def main():' -n 12 --temp 0 --ids --device cpu 2>/dev/null) && \
   [ \"$a\" = \"$b\" ] && [ \"$a\" = \"$c\" ] && echo \"same $a\"")
set_tests_properties(cli_offload_stream_ids PROPERTIES FIXTURES_REQUIRED zse_int4 PASS_REGULAR_EXPRESSION "same \\[[0-9]")

# a MoE model (mixtral: 2 layers of 4 experts) with a cache of one layer's experts: every
# miss fetched, every miss on the host
add_test(NAME cli_offload_experts_ids COMMAND sh -c
  "${ZSE} convert ${ZSE_TEST_FIXTURES}/random/mixtral -o ${OFF}/mixtral-int8.zse --quant int8 --force >/dev/null 2>&1 && \
   a=$(${ZSE} run ${OFF}/mixtral-int8.zse -p 'hello world' -n 12 --temp 0 --ids --device cpu 2>/dev/null) && \
   b=$(ZSE_EXPERT_CACHE=4 ZSE_HOST_EXPERTS=never ${ZSE} run ${OFF}/mixtral-int8.zse -p 'hello world' -n 12 --temp 0 --ids --device cpu 2>/dev/null) && \
   c=$(ZSE_EXPERT_CACHE=4 ZSE_HOST_EXPERTS=always ${ZSE} run ${OFF}/mixtral-int8.zse -p 'hello world' -n 12 --temp 0 --ids --device cpu 2>/dev/null) && \
   [ \"$a\" = \"$b\" ] && [ \"$a\" = \"$c\" ] && echo \"same $a\"")
set_tests_properties(cli_offload_experts_ids PROPERTIES FIXTURES_SETUP zse_mixtral PASS_REGULAR_EXPRESSION "same \\[[0-9]")

# bench says where the weights are and what each step moved
add_test(NAME cli_offload_bench_stream COMMAND zse bench ${OFF}/tiny-int4.zse --device cpu --prompt-tokens 16 --gen-tokens 4 --json)
set_tests_properties(cli_offload_bench_stream PROPERTIES FIXTURES_REQUIRED zse_int4 ENVIRONMENT "ZSE_STREAM_LAYERS=3"
  PASS_REGULAR_EXPRESSION "\"placement\": {\"mode\": \"streamed\", \"layers_resident\": 1, \"layers_streamed\": 3,.*\"offload\": {\"prefill\": {\"steps\": 1,.*\"layers_streamed\": 3\\.00.*\"decode\": {\"steps\": [34],.*\"layers_streamed\": 3\\.00, \"mb_to_device\": [0-9.]+}")
add_test(NAME cli_offload_bench_experts COMMAND zse bench ${OFF}/mixtral-int8.zse --device cpu --prompt-tokens 16 --gen-tokens 4)
set_tests_properties(cli_offload_bench_experts PROPERTIES FIXTURES_REQUIRED zse_mixtral
  ENVIRONMENT "ZSE_EXPERT_CACHE=5;ZSE_HOST_EXPERTS=always"
  PASS_REGULAR_EXPRESSION "placement: experts offloaded, 5 of 8 experts cached.*prefill, per step \\(1 steps\\): experts [0-9.]+ hit, 0\\.0 fetched, [0-9.]+ computed on the host.*decode, per step")

# zse info --gpu-memory: what zse run would do with that budget, or the least that runs
add_test(NAME cli_info_gpu_memory COMMAND zse info ${OFF}/tiny-int4.zse --gpu-memory 2G --ctx 256)
set_tests_properties(cli_info_gpu_memory PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "--gpu-memory 2048 MiB, ctx 256, f16 KV: resident.*every weight resident.*on the GPU: weights [0-9.]+ KB, activations")
add_test(NAME cli_info_gpu_memory_stream COMMAND zse info ${OFF}/tiny-int4.zse --gpu-memory 2G --ctx 256 --json)
set_tests_properties(cli_info_gpu_memory_stream PROPERTIES FIXTURES_REQUIRED zse_int4 ENVIRONMENT "ZSE_STREAM_LAYERS=2"
  PASS_REGULAR_EXPRESSION "\"placement\": {.*\"mode\": \"streamed\",.*\"layers\": 4,.*\"layers_streamed\": 2,.*\"stream_buffers\": 2,")
add_test(NAME cli_info_gpu_memory_too_small COMMAND zse info ${OFF}/tiny-int4.zse --gpu-memory 100M)
set_tests_properties(cli_info_gpu_memory_too_small PROPERTIES FIXTURES_REQUIRED zse_int4 WILL_FAIL TRUE)
add_test(NAME cli_info_gpu_memory_minimum COMMAND sh -c "${ZSE} info ${OFF}/tiny-int4.zse --gpu-memory 100M 2>&1; true")
set_tests_properties(cli_info_gpu_memory_minimum PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "needs at least [0-9]+ MiB of GPU memory with every layer streamed from host memory.*--gpu-memory allows 100 MiB")
add_test(NAME cli_info_gpu_memory_moe_minimum COMMAND sh -c "${ZSE} info ${OFF}/mixtral-int8.zse --gpu-memory 64M 2>&1; true")
set_tests_properties(cli_info_gpu_memory_moe_minimum PROPERTIES FIXTURES_REQUIRED zse_mixtral
  PASS_REGULAR_EXPRESSION "needs at least [0-9]+ MiB of GPU memory with its experts in host memory.*a cache for one layer's 4 experts")

# the CPU has nothing to budget; knobs are checked
add_test(NAME cli_gpu_memory_on_cpu COMMAND zse run ${OFF}/tiny-int4.zse -p x -n 1 --device cpu --gpu-memory 1G)
set_tests_properties(cli_gpu_memory_on_cpu PROPERTIES FIXTURES_REQUIRED zse_int4
  PASS_REGULAR_EXPRESSION "--gpu-memory has nothing to budget on the cpu backend")
add_test(NAME cli_offload_bad_knob COMMAND zse run ${OFF}/tiny-int4.zse -p x -n 1 --device cpu)
set_tests_properties(cli_offload_bad_knob PROPERTIES FIXTURES_REQUIRED zse_int4 ENVIRONMENT "ZSE_STREAM_BUFFERS=0"
  PASS_REGULAR_EXPRESSION "ZSE_STREAM_BUFFERS=0: a count from 1 to 64")
add_test(NAME cli_offload_bad_host_mode COMMAND zse run ${OFF}/tiny-int4.zse -p x -n 1 --device cpu)
set_tests_properties(cli_offload_bad_host_mode PROPERTIES FIXTURES_REQUIRED zse_int4 ENVIRONMENT "ZSE_HOST_EXPERTS=sometimes"
  PASS_REGULAR_EXPRESSION "ZSE_HOST_EXPERTS=sometimes: auto, never or always")

# tools/synth_model.py --zse-direct: the header zse convert writes for the same shape, every
# checksum right, and the file generates (dense, qwen3_moe, qwen2_moe with its shared expert)
find_package(Python3 COMPONENTS Interpreter REQUIRED)
foreach(case "dense;int4;--arch;qwen2;--layers;2;--hidden;256;--ffn;512;--heads;4;--kv-heads;2;--vocab;4096"
             "qwen3moe;int4;--arch;qwen3_moe;--layers;2;--hidden;128;--ffn;256;--heads;4;--kv-heads;2;--vocab;4096;--experts;8;--experts-used;2;--moe-ffn;64;--head-dim;32"
             "qwen2moe;int8;--arch;qwen2_moe;--layers;2;--hidden;128;--ffn;256;--heads;4;--kv-heads;2;--vocab;4096;--experts;4;--experts-used;2;--moe-ffn;64;--shared-ffn;128")
  list(GET case 0 name)
  list(SUBLIST case 1 -1 args)
  add_test(NAME synth_direct_${name} COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/golden/check_synth_direct.py
           $<TARGET_FILE:zse> ${PROJECT_BINARY_DIR}/synth-direct-${name} ${args})
  set_tests_properties(synth_direct_${name} PROPERTIES SKIP_RETURN_CODE 77 PASS_REGULAR_EXPRESSION "header as convert's")
endforeach()
