#!/usr/bin/env bash
# Re-take docs/ui-run-form.png: the UI's run form of wdsembed/on-demand in headless Chromium
# (Debian: apt-get install chromium). Needs a server with the deployments (deployments/README.md, steps 1-3)
# and PREFECT_API_URL pointing at it. Not a CI step: the PNG is committed.
#
#   deployments/screenshot_run_form.sh [OUT.png]
set -euo pipefail
api="${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api}"
id=$(curl -sf "$api/deployments/name/wdsembed/on-demand" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# The virtual time budget lets the single-page app fetch the deployment and render the form before the shot.
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --user-data-dir="$profile" --virtual-time-budget=20000 \
    --window-size=1400,3100 --screenshot="${1:-docs/ui-run-form.png}" "${api%/api}/v2/deployments/deployment/$id/run" \
    2> >(grep -v -e dbus -e 'unexpected operator' >&2)
