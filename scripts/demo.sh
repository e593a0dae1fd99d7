#!/usr/bin/env bash
# The main job, offline for now: validate the example plugins and show each VM's plan.
set -euo pipefail
cd "$(dirname "$0")/.."
roost=.venv/bin/roost
examples=examples/plugins

echo "== Validating the example plugins"
$roost plugin validate "$examples"/*/plugin.json

echo
echo "== secure-worker: a vsock-only VM (the plugin's default)"
$roost vm plan worker-1 --plugin "$examples/secure-worker/plugin.json"

echo
echo "== web-service: a bridged VM, address auto-assigned (the plugin's default)"
$roost vm plan web-1 --plugin "$examples/web-service/plugin.json"

echo
echo "== web-service: a bridged VM with a manual address (--network-ip)"
$roost vm plan web-2 --plugin "$examples/web-service/plugin.json" --network-ip 10.100.0.7

echo
echo "== web-service: a VM overridden to dhcp ($examples/web-service/vm-dhcp.json)"
$roost vm plan web-3 --plugin "$examples/web-service/plugin.json" \
    --config "$examples/web-service/vm-dhcp.json"
