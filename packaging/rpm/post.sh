# $1: 1 on first install, 2+ on upgrade.
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create fleetlet-agent.conf || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl enable --now fleetlet-agent.service >/dev/null 2>&1 || :
    fi
fi
