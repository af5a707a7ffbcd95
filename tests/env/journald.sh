# systemd-journald, standalone (PID 1 is not systemd on these machines).
JOURNAL_SOCKET=/run/systemd/journal/socket

up_journald() {
  [ -x /lib/systemd/systemd-journald ] || die "systemd-journald missing (apt-get install systemd)"
  if is_running journald; then
    log "journald already running"
    return 0
  fi
  # Another journald (not started by this stack) already serves the machine: use it, and leave
  # it alone on env-down.
  if [ -S "$JOURNAL_SOCKET" ] && pgrep -x systemd-journal >/dev/null; then
    log "using the machine's running journald"
    return 0
  fi
  mkdir -p /run/systemd/journal
  start_daemon journald /lib/systemd/systemd-journald
  wait_until 10 journald test -S "$JOURNAL_SOCKET" || { tail_log journald; die "journald did not start"; }
}

down_journald() { stop_daemon journald; }
