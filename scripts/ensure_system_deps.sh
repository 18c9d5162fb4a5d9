#!/usr/bin/env bash
# Installs the system packages GR-2 Serve needs on Debian/Ubuntu when they are missing:
#   python3-venv  (Debian/Ubuntu split venv out of python3)
#   redis-server  (the episode store; the tests start their own instances)
#   libegl1 + Mesa drivers (headless MuJoCo rendering with MUJOCO_GL=egl)
#   chromium + chromium-driver, with WITH_BROWSER=1 (the web page's browser test; make test)
# Uses sudo when not root. Prints what it does; does nothing when all is present.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
missing=()
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
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
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "[gr2] system packages installed"
