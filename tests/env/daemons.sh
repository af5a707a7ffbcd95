# Starting and stopping the stack's long-running processes (sourced after lib.sh).
# Each daemon has a pidfile under $FLEETLET_DEV_DIR/run and a log under $FLEETLET_DEV_DIR/logs.
RUN_DIR=$FLEETLET_DEV_DIR/run
LOG_DIR=$FLEETLET_DEV_DIR/logs

# shellcheck source=tests/env/proc.sh
source "$(dirname "${BASH_SOURCE[0]}")/proc.sh"

# alive PID: the process exists and is not a zombie (PID 1 here may reap late).
alive() { proc_alive "$1"; }

# is_running NAME: the pidfile names a live process, the very one that was started (same pid and
# start time: a rebuilt binary or a recycled pid cannot fool it; see proc.sh).
is_running() { pidfile_pid "$RUN_DIR/$1.pid" >/dev/null; }

# start_daemon NAME COMMAND...: runs COMMAND in its own session, output appended to its log.
start_daemon() {
  local name=$1; shift
  local exe
  exe=$(readlink -f "$(command -v "$1")")
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  # Logs are appended across starts; past 64 MiB the old part moves to NAME.log.old.
  if [ "$(stat -c %s "$LOG_DIR/$name.log" 2>/dev/null || echo 0)" -gt $((64 << 20)) ]; then
    mv -f "$LOG_DIR/$name.log" "$LOG_DIR/$name.log.old"
  fi
  printf '\n==== %s starting %s at %(%FT%TZ)T ====\n' "$name" "$*" -1 >> "$LOG_DIR/$name.log"
  # The lock descriptors (8: up.lock, 9: build.lock) must not outlive this script.
  # Started from / so that no daemon (nor the conmon processes Podman forks) keeps a checkout's
  # directory as its working directory: a deleted one breaks container starts.
  (cd / && exec setsid "$@" >> "$LOG_DIR/$name.log" 2>&1 < /dev/null 8>&- 9>&-) &
  pidfile_write "$RUN_DIR/$name.pid" "$!" "$exe"
  log "started $name (pid $!), log $LOG_DIR/$name.log"
}

# stop_daemon NAME: SIGTERM to the daemon's session (it was started with setsid, so helpers it
# forked go too), then SIGKILL after 15 s; removes the pidfile.
stop_daemon() {
  local name=$1 pid
  pid=$(pidfile_stop "$RUN_DIR/$name.pid" 150)
  [ -z "$pid" ] || log "stopped $name (pid $pid)"
}

# wait_until SECONDS WHAT COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_until() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "$what not ready after ${limit} s"
      return 1
    fi
    sleep 0.2
  done
}

# tail_log NAME: the end of a daemon's log, for error reports.
tail_log() {
  echo "---- last lines of $LOG_DIR/$1.log ----" >&2
  tail -n 40 "$LOG_DIR/$1.log" >&2 || true
}
