# Starting and stopping the stack's long-running processes (sourced after lib.sh).
# Each daemon has a pidfile under $FLEETLET_DEV_DIR/run and a log under $FLEETLET_DEV_DIR/logs.
RUN_DIR=$FLEETLET_DEV_DIR/run
LOG_DIR=$FLEETLET_DEV_DIR/logs

# alive PID: the process exists and is not a zombie (PID 1 here may reap late).
alive() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# is_running NAME: the pidfile names a live process running the recorded executable.
is_running() {
  local name=$1 pid exe
  [ -f "$RUN_DIR/$name.pid" ] || return 1
  read -r pid exe < "$RUN_DIR/$name.pid" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$exe" ]
}

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
  echo "$! $exe" > "$RUN_DIR/$name.pid"
  log "started $name (pid $!), log $LOG_DIR/$name.log"
}

# stop_daemon NAME: SIGTERM, then SIGKILL after 15 s; removes the pidfile.
stop_daemon() {
  local name=$1 pid exe i
  if ! is_running "$name"; then
    rm -f "$RUN_DIR/$name.pid"
    return 0
  fi
  read -r pid exe < "$RUN_DIR/$name.pid"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then
    log "$name (pid $pid) ignored SIGTERM for 15 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
  fi
  rm -f "$RUN_DIR/$name.pid"
  log "stopped $name (pid $pid)"
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
