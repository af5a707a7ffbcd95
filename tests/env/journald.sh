# systemd-journald, standalone (PID 1 is not systemd on these machines).
JOURNAL_SOCKET=/run/systemd/journal/socket

# A live (not zombie: its exe link still resolves) systemd-journald not started by the stack.
other_journald_running() {
  local pid
  for pid in $(pgrep -x systemd-journal); do
    readlink "/proc/$pid/exe" >/dev/null 2>&1 && return 0
  done
  return 1
}

up_journald() {
  [ -x /lib/systemd/systemd-journald ] || die "systemd-journald missing (apt-get install systemd)"
  if is_running journald; then
    log "journald already running"
    return 0
  fi
  # Another journald (not started by this stack) already serves the machine: use it, and leave
  # it alone on env-down.
  if [ -S "$JOURNAL_SOCKET" ] && other_journald_running; then
    log "using the machine's running journald"
    return 0
  fi
  mkdir -p /run/systemd/journal
  start_daemon journald /lib/systemd/systemd-journald
  wait_until 10 journald test -S "$JOURNAL_SOCKET" || { tail_log journald; die "journald did not start"; }
}

down_journald() { stop_daemon journald; }
