#!/bin/sh
# Progress of the CUDA build, for the user to see while pip runs it.
#
#   progress.sh say MESSAGE...                  prints "jevo: MESSAGE"
#   progress.sh compile STATE_DIR COMMAND...    runs COMMAND (a compile), saying which file and
#                                               how far the build is (compiler launcher)
#   progress.sh link STATE_DIR COMMAND...       runs COMMAND (the link), saying how long it took
#
# pip shows a build's output only with -v, so each line also goes to $JEVO_BUILD_NOTIFY: the
# terminal or pip's own stderr, chosen by cuda/packaging/jevo_build_backend.py (empty: nowhere
# else). STATE_DIR holds the build's start time (start), the number of sources a first build
# compiles (total) and of kernel files among them (kernels), and one line per compile started
# (started, started_kernels) and finished (finished, finished_kernels); CMake resets it at each
# configure. The time left is estimated from the kernel files, which take nearly all of the
# build's time.

say() {
  printf 'jevo: %s\n' "$*" >&2
  if [ -n "${JEVO_BUILD_NOTIFY:-}" ]; then
    if [ "$JEVO_BUILD_NOTIFY" = /dev/tty ]; then
      # \r: start at the left edge, over pip's spinner.
      { printf '\rjevo: %s\n' "$*" >>"$JEVO_BUILD_NOTIFY"; } 2>/dev/null || true
    else
      { printf 'jevo: %s\n' "$*" >>"$JEVO_BUILD_NOTIFY"; } 2>/dev/null || true
    fi
  fi
}

# Appends a line to STATE_DIR/$1 and prints the number of lines.
count() {
  { echo x >>"$state/$1"; } 2>/dev/null || { echo 0; return; }
  wc -l <"$state/$1" | tr -d ' '
}

minutes() {  # seconds -> "2m05s"
  printf '%dm%02ds' $(($1 / 60)) $(($1 % 60))
}

mode=${1:-}
[ $# -gt 0 ] && shift
case $mode in
  say)
    say "$@"
    exit 0
    ;;
  compile|link)
    state=$1
    shift
    ;;
  *)
    echo "progress.sh: unknown mode '$mode'" >&2
    exit 2
    ;;
esac

now=$(date +%s)
start=$(cat "$state/start" 2>/dev/null || echo "$now")
total=$(cat "$state/total" 2>/dev/null || echo 0)

if [ "$mode" = link ]; then
  "$@"
  rc=$?
  elapsed=$(($(date +%s) - start))
  if [ $rc -eq 0 ]; then
    say "CUDA library linked; the build took $(minutes $elapsed)"
  fi
  exit $rc
fi

# The source file: the argument after -c.
src=
prev=
for arg in "$@"; do
  [ "$prev" = -c ] && src=$arg
  prev=$arg
done
name=${src##*/cuda/}
[ -n "$name" ] || name=$src

n=$(count started)
case $name in kernels/*) count started_kernels >/dev/null ;; esac
kernels_started=$(wc -l <"$state/started_kernels" 2>/dev/null | tr -d ' ')
kernels_started=${kernels_started:-0}
kernels=$(cat "$state/kernels" 2>/dev/null || echo 0)
finished=$(wc -l <"$state/finished" 2>/dev/null | tr -d ' ')
finished=${finished:-0}
kernels_done=$(wc -l <"$state/finished_kernels" 2>/dev/null | tr -d ' ')
kernels_done=${kernels_done:-0}
elapsed=$((now - start))
if [ "$total" -gt 0 ] && [ "$n" -le "$total" ]; then
  where="[$n/$total]"
else
  where="[$n]"
fi
line="$where compiling $name"
if [ "$finished" -gt 0 ]; then
  line="$line, $finished done in $(minutes $elapsed)"
  if [ "$kernels_done" -gt 0 ] && [ "$kernels" -gt "$kernels_done" ]; then
    # Files being compiled count as half done: there are several at a time.
    half_done=$((2 * kernels_done + kernels_started - kernels_done))
    left=$((elapsed * (2 * kernels - half_done) / half_done))
    line="$line, about $(minutes $left) left"
  fi
fi
say "$line"

"$@"
rc=$?
count finished >/dev/null
case $name in kernels/*) count finished_kernels >/dev/null ;; esac
if [ $rc -ne 0 ]; then
  say "compiling $name failed (exit code $rc); the compiler's messages follow pip's error"
fi
exit $rc
