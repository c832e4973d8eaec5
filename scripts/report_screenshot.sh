#!/usr/bin/env bash
# Render an HTML report in a real headless browser (Debian's chromium) to a PNG, to look at what
# a reader sees: the layout, the plots' labels and legends, the tables. Opt-in: no test runs it.
#
#   scripts/report_screenshot.sh REPORT.html [OUT.png]
#   scripts/report_screenshot.sh CONFIG.yaml [OUT.png] [report options...]   # runs `report` first
#
# With a config (an experiment's or a sweep's, of a finished run), `backdoor-train report` writes
# the page to a temporary file first; options after OUT.png go to it (--seeds 1-3, --set k=v).
# WIDTH (1280) and HEIGHT (6000) set the browser window: the PNG is that window, so a long report
# needs a tall one. Needs chromium (`apt-get install -y --no-install-recommends chromium`).
set -euo pipefail

usage() { echo "usage: $0 REPORT.html|CONFIG.yaml [OUT.png] [report options...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
src=$1; shift
out=${1:-report.png}; [ $# -ge 1 ] && shift
[ -f "$src" ] || { echo "$0: $src: no such file" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "$0: chromium not found (apt-get install -y --no-install-recommends chromium)" >&2; exit 2; }

here=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
case "$src" in
  *.html|*.htm) page=$src ;;
  *) page=$tmp/report.html
     "$here/.venv/bin/backdoor-train" report "$src" --out "$page" "$@" ;;
esac

# --user-data-dir: a fresh profile, so a running browser or an old one's lock cannot interfere.
"$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$tmp/profile" \
  --window-size="${WIDTH:-1280},${HEIGHT:-6000}" --screenshot="$(realpath -m "$out")" \
  "file://$(realpath "$page")" 2>"$tmp/chromium.log" || { cat "$tmp/chromium.log" >&2; exit 1; }
[ -s "$out" ] || { cat "$tmp/chromium.log" >&2; echo "$0: no screenshot written" >&2; exit 1; }
echo "screenshot of the report of $src written to $out"
