# $1: 0 on removal, 1+ on upgrade (then the new binary is in place: restart into it).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart fleetlet-agent.service >/dev/null 2>&1 || :
    fi
fi
