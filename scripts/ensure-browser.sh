#!/usr/bin/env bash
# Makes sure the report test can open a report in a real browser: Debian's chromium at
# /usr/bin/chromium, Node.js with npm, and playwright-core (pinned in tests/browser/package-lock.json)
# installed into tests/browser/node_modules. As root with apt-get it installs the packages that are
# missing; without root it says what is missing, and the test names it too.
set -euo pipefail
log() { printf '[ensure-browser] %s\n' "$*" >&2; }
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing ${missing[*]} from Debian's packages"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        log "missing ${missing[*]} and cannot install them here (need root and apt-get); the report test will fail and say so"
        exit 0
    fi
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
    log "installing playwright-core into tests/browser (npm ci)"
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error >/dev/null
fi
