#!/usr/bin/env bash
# Makes sure /usr/bin/prometheus (Debian's prometheus package, 2.42) is installed for the
# observability tests, which start their own Prometheus on a free port with a temporary configuration.
# As root with apt-get it installs the package without its recommends and stops the service the
# package starts (the tests never use it). Without root it says so, and the test names what is missing.
set -euo pipefail
log() { printf '[ensure-prometheus] %s\n' "$*" >&2; }

if [ -x /usr/bin/prometheus ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing prometheus from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    # policy-rc.d exit 101: do not start the packaged service (it would take port 9090). One the
    # machine already has is left as it is.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null || status=$?
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    exit "$status"
else
    log "prometheus is not installed and cannot be installed here (need root and apt-get); the Prometheus test will fail and say so"
fi
