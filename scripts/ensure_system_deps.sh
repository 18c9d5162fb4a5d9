#!/usr/bin/env bash
# Installs the system packages GR-2 Serve needs on Debian/Ubuntu when they are missing:
#   python3-venv  (Debian/Ubuntu split venv out of python3)
#   redis-server  (the episode store; the tests start their own instances)
#   prometheus    (for promtool, with WITH_PROMTOOL=1: the alert-rule tests; make test; the
#                 Prometheus daemon is not started)
#   libegl1 + Mesa drivers (headless MuJoCo rendering with MUJOCO_GL=egl)
#   chromium + chromium-driver, with WITH_BROWSER=1 (the web page's browser test; make test)
# Uses sudo when not root. Prints what it does; does nothing when all is present.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
missing=()
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${WITH_PROMTOOL:-0}" = 1 ]; then
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
fi
ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || missing+=(libegl1)
ldconfig -p 2>/dev/null | grep -q 'libGL.so.1' || missing+=(libgl1)
[ -e /usr/share/glvnd/egl_vendor.d/50_mesa.json ] || missing+=(libegl-mesa0 libgl1-mesa-dri)
if [ "${WITH_BROWSER:-0}" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "[gr2] installing system packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "[gr2] need root or sudo to apt-get install ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# The prometheus package's postinst starts its daemon (invoke-rc.d without systemd, as in a
# container; systemd where it runs) and fails the install when that start fails. Only promtool
# is wanted: forbid service starts for this install with a policy-rc.d (exit 101: "action
# forbidden"; invoke-rc.d and deb-systemd-invoke then skip the start and succeed), unless the
# machine has a policy of its own (Docker images ship one that does the same).
POLICY_RC_D=/usr/sbin/policy-rc.d
if [[ " ${missing[*]} " == *" prometheus "* ]] && [ ! -e "$POLICY_RC_D" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY_RC_D" >/dev/null
  $SUDO chmod 755 "$POLICY_RC_D"
  trap '$SUDO rm -f "$POLICY_RC_D"' EXIT
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
  # postinst enables the unit even when its start is forbidden: keep it off at boot too.
  $SUDO systemctl disable --quiet prometheus.service || true
fi
echo "[gr2] system packages installed"
