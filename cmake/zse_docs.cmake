# Writes the man page zse(1) and the bash completion from the built zse's own help, so both
# say exactly what this zse says: `zse --help` gives the commands, `zse COMMAND --help`
# each command's options. Run by the build (CMakeLists.txt, target zse_docs):
#   cmake -DZSE=path/to/zse -DMAN=out/zse.1 -DCOMPLETION=out/zse.bash-completion
#         -DVERSION=x.y.z -P cmake/zse_docs.cmake
# The ENVIRONMENT section is written here; tests/cmake/install.cmake checks that it names
# every ZSE_* variable the sources read.

execute_process(COMMAND ${ZSE} --help OUTPUT_VARIABLE top RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "zse --help failed (${rc})")
endif()

# "  verb         summary" lines after "commands:"
string(REGEX REPLACE "^.*\ncommands:\n" "" command_lines "${top}")
# (a ';' in a summary would split a CMake list item: rows are matched without them)
string(REPLACE ";" "," command_rows "${command_lines}")
string(REGEX MATCHALL "  [a-z][a-z-]* +[^\n]*" command_rows "${command_rows}")
set(verbs "")
set(aliases "")
foreach(row ${command_rows})
  string(REGEX REPLACE "^  ([a-z][a-z-]*) .*$" "\\1" v "${row}")
  list(APPEND verbs ${v})
  if(row MATCHES "\\(also: zse ([a-z-]+)\\)")
    list(APPEND aliases "${CMAKE_MATCH_1}=${v}")
  endif()
endforeach()
list(LENGTH verbs n_verbs)
if(n_verbs LESS 5)
  message(FATAL_ERROR "zse --help listed ${n_verbs} commands; cannot write the documentation")
endif()
string(REGEX MATCH "^zse [^ ]+ — ([^\n]*)" _ "${top}")
set(tagline "${CMAKE_MATCH_1}")

# text for roff: backslashes escaped, '-' a minus (copy-pasted options must work), a line
# starting with . or ' protected
function(roff_escape in out)
  string(REPLACE "\\" "\\e" t "${in}")
  string(REPLACE "-" "\\-" t "${t}")
  string(REGEX REPLACE "(^|\n)([.'])" "\\1\\\\&\\2" t "${t}")
  set(${out} "${t}" PARENT_SCOPE)
endfunction()

roff_escape("${tagline}" tag)
set(man ".\\\" zse(1): generated from zse ${VERSION}'s --help by cmake/zse_docs.cmake; do not edit\n")
string(APPEND man ".TH ZSE 1 \"\" \"zse ${VERSION}\" \"User Commands\"\n")
string(APPEND man ".SH NAME\nzse \\- ${tag}\n")
string(APPEND man ".SH SYNOPSIS\n.B zse\n.I command\n.RI [ options ]\n.br\n.B zse\n.BR \\-\\-help \" | \" \\-\\-version\n")
string(APPEND man ".SH DESCRIPTION\n")
string(APPEND man "zse converts a Hugging Face model directory or a GGUF file into one pre-quantized .zse file "
                  "(weights, tokenizer, chat template, config), runs it on a CPU or a CUDA GPU, and serves it "
                  "behind an OpenAI-compatible HTTP API.\n.PP\n"
                  "Each command below is followed by its own help, as \\fBzse\\fR \\fIcommand\\fR \\fB\\-\\-help\\fR prints it.\n")
string(APPEND man ".SH COMMANDS\n")

set(completion_cases "")
foreach(v ${verbs})
  execute_process(COMMAND ${ZSE} ${v} --help OUTPUT_VARIABLE help RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "zse ${v} --help failed (${rc})")
  endif()
  string(REGEX MATCH "  ${v} +([^\n]*)" _ "${command_lines}")
  roff_escape("${CMAKE_MATCH_1}" summary)
  roff_escape("${help}" body)
  string(APPEND man ".SS \"zse ${v}\"\n${summary}\n.PP\n.nf\n.RS 4\n${body}.RE\n.fi\n")

  # completion: every option the help names, and the choices an option lists as a|b|c
  string(REGEX REPLACE "[][(),|;=\n]" " " flat "${help}")
  string(REGEX MATCHALL " --?[a-zA-Z][a-z0-9-]*" opts " ${flat}")
  set(words "")
  foreach(o ${opts})
    string(STRIP "${o}" o)
    list(APPEND words "${o}")
  endforeach()
  list(APPEND words --help)
  list(REMOVE_DUPLICATES words)
  list(JOIN words " " words)
  string(APPEND completion_cases "        ${v}) opts=\"${words}\" ;;\n")
endforeach()

string(APPEND man ".SH ENVIRONMENT\n"
  ".TP\n.B ZSE_DB\nthe key and audit database of \\fBzse serve \\-\\-auth\\fR, \\fBzse api\\-key\\fR and \\fBzse audit\\fR "
  "(default: $XDG_DATA_HOME/zse/zse.db or ~/.local/share/zse/zse.db)\n"
  ".TP\n.B ZSE_CPU_KERNELS\n\\fBportable\\fR, \\fBavx2\\fR, \\fBavx512\\fR or \\fBauto\\fR: the CPU matmul kernels "
  "(default: the best this CPU runs; portable is the exact f32 reference)\n"
  ".TP\n.B ZSE_CUDA_GRAPHS\n0 turns off recording decode steps as CUDA graphs\n"
  ".TP\n.B ZSE_CUDA_NO_MMA\n1 turns off the tensor-core matmul and attention kernels\n"
  ".TP\n.B ZSE_CUDA_NO_PDL\n1 turns off programmatic dependent launch (sm_90)\n"
  ".TP\n.B ZSE_CUDA_LORA_FOLD\n0 keeps a LoRA delta in its own launch after the matmul instead of folding it into the one-row 4-bit GEMV\n"
  ".TP\n.B ZSE_HOST_EXPERTS\n\\fBauto\\fR, \\fBnever\\fR or \\fBalways\\fR: which experts a model with its experts in host "
  "memory runs on the CPU when the GPU's expert cache misses them (default auto: where that finishes sooner)\n"
  ".TP\n.B ZSE_STREAM_BUFFERS\nthe GPU layer buffers streamed layers pass through (1..64, default 2)\n"
  ".TP\n.B ZSE_EXPERT_CACHE\nkeep a mixture-of-experts model's experts in host memory with at most this many cached "
  "on the device, whatever the budget (tests, comparisons)\n"
  ".TP\n.B ZSE_STREAM_LAYERS\nstream at least this many layers of a dense model from host memory, whatever the budget "
  "(tests, comparisons)\n"
  ".TP\n.B ZSE_CUDA_PIN_COPY\n1 copies weights kept in host memory into pinned memory instead of registering the "
  "file's pages\n"
  ".TP\n.B ZSE_MODEL\nthe model file of \\fBzse serve\\fR when its command line names none\n"
  ".TP\n.BR ZSE_HOST \", \" ZSE_PORT \", \" ZSE_API_KEY \", \" ZSE_MAX_SEQS \", ...\"\n"
  "every \\fBzse serve\\fR flag \\fB\\-\\-some\\-flag\\fR has a variable \\fBZSE_SOME_FLAG\\fR "
  "(\\fB\\-\\-served\\-model\\-name\\fR is ZSE_SERVED_MODEL_NAME, \\fB\\-\\-chat\\-template\\fR "
  "ZSE_CHAT_TEMPLATE, \\fB\\-\\-pooling\\fR ZSE_POOLING, \\fB\\-\\-max\\-queue\\fR ZSE_MAX_QUEUE, ...); "
  "a flag on the command line wins over its variable. Switches (ZSE_AUTH, ZSE_NO_AUDIT, ZSE_NO_PREFIX_CACHE, "
  "ZSE_ALLOW_LORA_LOADING, ZSE_QUIET) take 1/true/yes/on or 0/false/no/off; ZSE_LORA and "
  "ZSE_SERVED_MODEL_NAME take values separated by spaces. ZSE_API_KEY alone requires that key "
  "(\\fB\\-\\-api\\-key\\fR)\n")
string(APPEND man ".SH FILES\n"
  ".TP\n.I /etc/zse/zse.env\nthe settings of the systemd service (ZSE_MODEL, ZSE_HOST, ZSE_PORT, ZSE_ARGS, ZSE_DB)\n"
  ".TP\n.I \\(ti/.local/share/zse/zse.db\nAPI keys and the audit log (see ZSE_DB)\n")
string(APPEND man ".SH EXAMPLES\n.nf\n.RS 4\n"
  "zse convert ./Qwen2.5\\-7B\\-Instruct \\-o qwen7b.zse \\-\\-quant int4\n"
  "zse convert model\\-Q4_K_M.gguf \\-o model.zse\n"
  "zse hardware \\-\\-fit qwen7b.zse\n"
  "zse run qwen7b.zse \\-p \"def fibonacci(n):\" \\-n 64 \\-\\-temp 0\n"
  "zse serve qwen7b.zse \\-\\-host 0.0.0.0 \\-\\-port 8000 \\-\\-auth\n.RE\n.fi\n")
string(APPEND man ".SH SEE ALSO\nThe project's README.md and docs/ (SERVER.md, FORMAT.md, CUDA.md).\n")
file(WRITE ${MAN} "${man}")

list(JOIN verbs " " verb_words)
set(alias_cases "")
foreach(a ${aliases})
  string(REPLACE "=" ";" pair "${a}")
  list(GET pair 0 from)
  list(GET pair 1 to)
  string(APPEND alias_cases "    [[ $verb == ${from} ]] && verb=${to}\n")
  string(APPEND verb_words " ${from}")
endforeach()
# option values: the schemes `zse convert --help` lists, and a|b|c choices of any command
execute_process(COMMAND ${ZSE} convert --help OUTPUT_VARIABLE convert_help)
string(REGEX MATCH "--quant SCHEME +([^(]*)" _ "${convert_help}")
string(REGEX MATCHALL "[a-z0-9]+" schemes "${CMAKE_MATCH_1}")
list(REMOVE_ITEM schemes or)
list(JOIN schemes " " schemes)

file(WRITE ${COMPLETION} "# bash completion for zse ${VERSION}: generated from its --help by cmake/zse_docs.cmake
_zse()
{
    local cur=\${COMP_WORDS[COMP_CWORD]} prev=\${COMP_WORDS[COMP_CWORD-1]}
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=( $(compgen -W \"${verb_words} --help --version\" -- \"$cur\") )
        return
    fi
    local verb=\${COMP_WORDS[1]} opts=\"\"
${alias_cases}    case $prev in
        --quant|--embed-quant|--lm-head-quant) COMPREPLY=( $(compgen -W \"${schemes}\" -- \"$cur\") ); return ;;
        --kv-cache) COMPREPLY=( $(compgen -W \"f16 int8\" -- \"$cur\") ); return ;;
        --device) COMPREPLY=( $(compgen -W \"cpu cuda cuda:0 cuda:1\" -- \"$cur\") ); return ;;
        --group-size) COMPREPLY=( $(compgen -W \"32 64 128\" -- \"$cur\") ); return ;;
        -o|--output|-f|--file|--fit|--kld-base|--template|--chat-template|--context|--db|--tls-cert|--tls-key|--dump-logits|--dump-argmax)
            COMPREPLY=( $(compgen -f -- \"$cur\") ); return ;;
    esac
    case $verb in
${completion_cases}    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=( $(compgen -W \"$opts\" -- \"$cur\") )
    else
        COMPREPLY=( $(compgen -f -- \"$cur\") )
    fi
}
complete -o filenames -o bashdefault -F _zse zse
")
