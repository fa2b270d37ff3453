#!/usr/bin/env bash
# A site's live dashboard with some traffic on it, and a screenshot of it (how
# docs/dashboard.png was made). Two real site daemons in two regions; the first serves its
# dashboard and metrics; a buyer runs matmul jobs and a few chat generations (SmolLM2 through
# the market: tokens and the input cache show) against them for about a minute.
#
#   scripts/dashboard-demo.sh [SCREENSHOT.png]      (needs chromium; the models via scripts/models.sh)
#
# While it runs: http://127.0.0.1:48484/ (the dashboard), http://127.0.0.1:49464/metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
shot=${1:-docs/dashboard.png}
. scripts/models.sh
cargo build -q -p hashgrid-node --bins
bin=target/debug
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
net=dashboard-demo

site() { # index region port price [extra args]
    local dir="$work/site-$1"
    "$bin/hashgrid-node" --data-dir "$dir" run --network "$net" --region "$2" \
        --listen "/ip4/127.0.0.1/tcp/$3" --price "$4" --units 2 --no-mdns "${@:5}" \
        >/dev/null 2>"$dir.log" &
    pids+=($!)
}
boot="/ip4/127.0.0.1/tcp/47101/p2p/$("$bin/hashgrid-node" --data-dir "$work/site-1" id)"
site 1 eu-north 47101 100 --dashboard 127.0.0.1:48484 --metrics 127.0.0.1:49464
site 2 us-east 47102 120 --bootstrap "$boot"
sleep 5
buyer=(--data-dir "$work/buyer" --network "$net" --bootstrap "$boot" -q)
"$bin/hashgrid" "${buyer[@]}" init >/dev/null
echo "dashboard: http://127.0.0.1:48484/  (traffic for about a minute)"
for round in 1 2 3; do
    for _ in $(seq 8); do
        "$bin/hashgrid" "${buyer[@]}" submit examples/kernels/matmul/job.toml >/dev/null || true
    done
    "$bin/hashgrid" "${buyer[@]}" generate --model "$HASHGRID_SMOLLM2" --chat \
        --prompt "Name a use of a GPU (round $round)." --max-tokens 24 >/dev/null || true
done
sleep 3
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=3000 \
    --window-size=1400,1150 --user-data-dir="$work/chromium" --screenshot="$shot" \
    http://127.0.0.1:48484/ 2>/dev/null
echo "screenshot: $shot"
