#!/usr/bin/env bash
# The install, as a user gets it: `cmake --install` into a temporary prefix, then
#   - a C program using only zse.h, built with `cc app.c $(pkg-config --cflags --libs zse)`
#     (the shared libzse) and once against libzse.a (zse.pc's libs_private), run on a model;
#   - the installed zse, zse.h, zse(1) (man renders it, it lists every command and names
#     every ZSE_* variable the sources read), the bash completion (complete -p, compgen);
#   - the installed systemd unit passes systemd-analyze verify.
# usage: check_install.sh BUILD_DIR SOURCE_DIR WORK_DIR MODEL.zse [EXTRA_CFLAGS]
set -euo pipefail
BUILD=$1 SRC=$2 WORK=$3 MODEL=$4 EXTRA=${5:-}
P=$WORK/prefix
rm -rf "$WORK" && mkdir -p "$WORK"
fail() { echo "FAIL: $*"; exit 1; }
ok() { echo "ok   $*"; passed=$((passed + 1)); }
passed=0

cmake --install "$BUILD" --prefix "$P" >"$WORK/install.log" || { cat "$WORK/install.log"; fail "cmake --install"; }
libdir=$(dirname "$(find "$P" -name zse.pc)")/..
for f in bin/zse include/zse.h share/man/man1/zse.1 share/bash-completion/completions/zse \
         lib/systemd/system/zse.service lib/sysusers.d/zse.conf share/doc/zse/zse.env.example; do
  [ -e "$P/$f" ] || fail "$f not installed"
done
[ -e "$libdir/libzse.a" ] && [ -e "$libdir/libzse.so" ] && [ -e "$libdir/libzse.so.0" ] || fail "libzse.a / libzse.so not installed"
ok "installed: zse, libzse.a, libzse.so(.0), zse.h, zse.pc, zse(1), completion, systemd unit and sysusers"

export PKG_CONFIG_PATH=$libdir/pkgconfig
[ "$(pkg-config --modversion zse)" = "$("$P/bin/zse" --version | cut -d' ' -f2)" ] || fail "pkg-config version"
# the .pc file finds its prefix where it lies: a relocated install still points at itself
case "$(pkg-config --cflags zse)" in *"$WORK"*) ;; *) fail "pkg-config --cflags does not point into the install";; esac
# shellcheck disable=SC2046,SC2086
cc -std=c11 -Wall -Wextra -Werror $EXTRA "$SRC/tests/install/app.c" $(pkg-config --cflags --libs zse) -o "$WORK/app"
out=$(LD_LIBRARY_PATH=$libdir "$WORK/app" "$MODEL" "def fibonacci(n):")
echo "$out"
case "$out" in "zse "*"prompt "*" tokens:"?*) ;; *) fail "the shared-library program printed no text";; esac
needed=$(readelf -d "$WORK/app")
grep -q "NEEDED.*libzse.so.0" <<<"$needed" || fail "the program does not use libzse.so"
ok "cc app.c \$(pkg-config --cflags --libs zse): links against libzse.so and generates"
# shellcheck disable=SC2046,SC2086
# libzse.a with its dependencies' shared libraries (pkg-config --static would want every
# dependency's static library too)
cc -std=c11 -Wall -Wextra -Werror $EXTRA "$SRC/tests/install/app.c" $(pkg-config --cflags zse) "$libdir/libzse.a" \
   $(pkg-config --libs $(pkg-config --print-requires-private zse)) $(pkg-config --variable=libs_private zse) \
   -o "$WORK/app-static"
out2=$("$WORK/app-static" "$MODEL" "def fibonacci(n):")
[ "$out2" = "$out" ] || fail "the static build printed something else: $out2"
needed=$(readelf -d "$WORK/app-static")
grep -q "libzse" <<<"$needed" && fail "the static build needs libzse.so"
ok "libzse.a with its dependencies from pkg-config: the same output, no libzse.so"

# zse(1): renders without warnings, lists every command, names every ZSE_* variable read
man -l "$P/share/man/man1/zse.1" >/dev/null 2>"$WORK/man.err" && [ ! -s "$WORK/man.err" ] || { cat "$WORK/man.err"; fail "man zse.1"; }
groff -man -ww -z "$P/share/man/man1/zse.1" 2>"$WORK/groff.err" && [ ! -s "$WORK/groff.err" ] || { cat "$WORK/groff.err"; fail "groff warnings"; }
text=$(MANWIDTH=200 man -l "$P/share/man/man1/zse.1" 2>/dev/null)
for verb in $("$P/bin/zse" --help | sed -n '/^commands:/,$p' | awk 'NR>1 {print $1}'); do
  grep -q "zse $verb" <<<"$text" || fail "zse(1) lacks the command $verb"
  # the whole help first: `| head -1` would close the pipe under a help longer than stdio's
  # buffer (serve's), and the SIGPIPE fails the pipeline under pipefail
  help=$("$P/bin/zse" "$verb" --help)
  first=$(head -1 <<<"$help" | sed 's/  */ /g')
  grep -qF "$first" <<<"$(sed 's/  */ /g' <<<"$text")" || fail "zse(1) lacks the help of $verb ($first)"
done
for v in $(grep -rhoE 'getenv\("ZSE_[A-Z0-9_]+"' "$SRC/src" | sed 's/getenv("//; s/"//' | sort -u); do
  grep -q "$v" <<<"$text" || fail "zse(1) ENVIRONMENT does not name $v (read in src/)"
done
ok "zse(1) renders, holds every command's --help and every ZSE_* variable"

# bash completion: registered for zse, and completes commands, options and values
comp=$(bash -c '
  source "$1"
  complete -p zse
  complete_at() { COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMPREPLY=(); _zse; echo "${COMPREPLY[*]}"; }
  echo "verbs: $(complete_at zse tem)"
  echo "alias: $(complete_at zse bench)"
  echo "opts: $(complete_at zse convert model.gguf --qu)"
  echo "quant: $(complete_at zse convert model.gguf --quant int)"
  echo "kv: $(complete_at zse benchmark m.zse --kv-cache "")"
  echo "fit: $(complete_at zse hardware --f)"
' _ "$P/share/bash-completion/completions/zse")
echo "$comp"
grep -q "^complete .*-F _zse zse$" <<<"$comp" || fail "complete -p zse"
grep -q "^verbs: template$" <<<"$comp" || fail "command completion"
grep -q "^alias: bench benchmark$" <<<"$comp" || fail "alias completion"
grep -q "^opts: --quant$" <<<"$comp" || fail "option completion"
grep -q "^quant: int8 int8g int4 int4s$" <<<"$comp" || fail "--quant values"
grep -q "^kv: f16 int8$" <<<"$comp" || fail "--kv-cache values through the benchmark alias"
grep -q "^fit: --fit$" <<<"$comp" || fail "zse hardware --fit"
ok "bash completion: complete -p zse, commands, aliases, options, option values"

# the installed unit (ExecStart at this install's zse) verifies; its man page link resolves
unit=$WORK/unit/zse.service
mkdir -p "$WORK/unit" && cp "$P/lib/systemd/system/zse.service" "$unit"
grep -q "^ExecStart=$P/bin/zse serve " "$unit" || fail "ExecStart does not point at the installed zse"
if ! command -v systemd-analyze >/dev/null; then
  echo "skip systemd-analyze verify: systemd-analyze is not installed (Debian package systemd)"
elif MANPATH=$P/share/man systemd-analyze verify "$unit" >"$WORK/verify.log" 2>&1; then
  ok "systemd-analyze verify zse.service"
else
  cat "$WORK/verify.log"
  fail "systemd-analyze verify zse.service"
fi
echo "$passed passed, 0 failed"
