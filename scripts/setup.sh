#!/usr/bin/env bash
# One-time machine set-up for curvefs_py on Debian 12 (run as root). Idempotent.
#  - Debian packages: FUSE 3 (+ headers for pyfuse3), fio, BCC (python3-bpfcc) and a
#    kernel header tree for BCC, Redis and PostgreSQL servers (tests of the scale-out engines)
#  - BCC needs /lib/modules/$(uname -r)/build; when no headers match the running kernel we
#    link Debian's linux-headers-amd64 there: BCC builds tracepoint argument structs from
#    tracefs format files, so any recent header tree compiles our tracepoint-only programs.
#  - tracefs mounted at /sys/kernel/tracing
#  - curvefs_py/fuse/_ptshim.so: the small C library that lets libfuse 3.14 use FUSE
#    passthrough (Linux >= 6.9), compiled from curvefs_py/fuse/ptshim.c
#  - a virtualenv in .venv with the package (editable) and its test dependencies; BCC's
#    Python module (Debian's, not PyPI's unrelated "bcc") is linked into it.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PKGS="fuse3 libfuse3-dev pkg-config gcc python3-dev fio attr python3-bpfcc linux-headers-amd64 redis-server postgresql"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

# BCC kernel headers
K=$(uname -r)
if [ ! -e "/lib/modules/$K/build/include/linux/kconfig.h" ] && [ ! -e "/lib/modules/$K/source/include/linux/kconfig.h" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$hdr" ]; then
    common=${hdr%-amd64}-common
    mkdir -p "/lib/modules/$K"
    ln -sfn "$hdr" "/lib/modules/$K/build"
    [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$K/source"
    echo "setup: BCC headers: /lib/modules/$K/build -> $hdr"
  fi
fi
# tracefs
if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || echo "setup: warning: cannot mount tracefs (BPF counters will be unavailable)"
fi
# fuse: allow_other needs user_allow_other only for non-root; root may always use it.

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "is ignored: it is neither" || true
# Debian's BCC module into the venv (only that package, not all of dist-packages)
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ]; then
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi
# FUSE passthrough shim (libfuse 3.14 cannot request passthrough itself; see curvefs_py/fuse/ptshim.c)
cc -O2 -Wall -shared -fPIC -o curvefs_py/fuse/_ptshim.so curvefs_py/fuse/ptshim.c -lpthread
.venv/bin/python -c 'import pyfuse3, trio, boto3' 
echo "setup: done (.venv ready)"
