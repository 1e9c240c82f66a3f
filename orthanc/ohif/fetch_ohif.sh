#!/bin/sh
# Fetch the prebuilt OHIF viewer (npm package @ohif/app, folder dist/) without building it,
# and put our app-config.js in place. Needs npm (Debian: apt-get install npm) and the npm
# registry; nothing else is downloaded. Usage: orthanc/ohif/fetch_ohif.sh [DEST] [VERSION]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-"$here/dist"}
version=${2:-3.13.2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@ohif/app@$version" >/dev/null)
tar -xzf "$work"/ohif-app-*.tgz -C "$work"
rm -rf "$dest"
mv "$work/package/dist" "$dest"
# The dist's own app-config.js points at a public demo server; ours reads this Orthanc only.
cp "$here/app-config.js" "$dest/app-config.js"
echo "OHIF $version in $dest; serve it with: python3 $here/serve_ohif.py --dist $dest"
