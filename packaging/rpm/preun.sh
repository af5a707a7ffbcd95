# $1: 0 on removal, 1+ on upgrade. Stop and disable only when the package goes away.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl disable --now fleetlet-agent.service >/dev/null 2>&1 || :
fi
