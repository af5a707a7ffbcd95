# Process identity for pidfiles (sourced by tests/env/daemons.sh and tests/demo/lib.sh).
#
# A pidfile holds `PID EXE` on its first line and the process's START time on its second: field
# 22 of /proc/PID/stat, clock ticks since boot, which stays the same across exec and differs for
# a recycled pid. The executable path alone cannot tell: after a rebuild, /proc/PID/exe reads
# "PATH (deleted)" and a path comparison takes the live process for a stranger (it then survives
# `make demo-down`/`env-down`). The first line is the old format, so scripts of older checkouts
# sharing the stack still read these files; a file without the second line (written by them) is
# checked by its executable, with or without the " (deleted)" suffix.

# proc_start PID: prints the start time of PID (fails when there is no such process).
proc_start() {
  local stat rest
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  # The command name (field 2) may hold spaces and parentheses: fields start after the last ")".
  rest=${stat##*) }
  # shellcheck disable=SC2086
  set -- $rest
  # $1 is field 3 (state); field 22 is the 20th from here.
  [ $# -ge 20 ] || return 1
  printf '%s\n' "${20}"
}

# proc_alive PID: the process exists and is not a zombie.
proc_alive() {
  local stat rest
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  rest=${stat##*) }
  case ${rest%% *} in Z | X | '') return 1 ;; esac
}

# pidfile_write FILE PID EXE: records PID, its executable and its start time.
pidfile_write() {
  local file=$1 pid=$2 exe=$3 start
  start=$(proc_start "$pid") || start=0
  printf '%s %s\n%s\n' "$pid" "$exe" "$start" > "$file"
}

# pidfile_pid FILE: prints the pid of FILE when that very process still runs (alive, same start
# time; for a file without a start time, same executable even if rebuilt). Fails otherwise.
pidfile_pid() {
  local file=$1 pid exe start='' actual
  [ -f "$file" ] || return 1
  { read -r pid exe || [ -n "${pid:-}" ]; read -r start || true; } < "$file"
  case ${pid:-} in '' | *[!0-9]*) return 1 ;; esac
  proc_alive "$pid" || return 1
  case $start in
    '')
      actual=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
      [ "$actual" = "$exe" ] || [ "$actual" = "$exe (deleted)" ] || return 1
      ;;
    *[!0-9]*) return 1 ;;
    *)
      [ "$(proc_start "$pid" 2>/dev/null)" = "$start" ] || return 1
      ;;
  esac
  printf '%s\n' "$pid"
}

# pidfile_stop FILE [GRACE_TENTHS]: stops the process of FILE and every process of its session
# (they were started with setsid, so the process group is the session), SIGTERM then SIGKILL
# after GRACE_TENTHS tenths of a second (default 50); removes FILE. Prints the pid it stopped.
pidfile_stop() {
  local file=$1 grace=${2:-50} pid i
  if ! pid=$(pidfile_pid "$file"); then
    rm -f "$file"
    return 0
  fi
  # The group first (children such as a logger), then the process itself in case it left it.
  kill -TERM -- "-$pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace; i++)); do
    proc_alive "$pid" || break
    sleep 0.1
  done
  if proc_alive "$pid"; then
    echo "pid $pid ignored SIGTERM for $((grace / 10)) s; killing it" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do proc_alive "$pid" || break; sleep 0.1; done
  fi
  # Whatever is left of the group (a child that ignored SIGTERM) goes too.
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$file"
  printf '%s\n' "$pid"
}
