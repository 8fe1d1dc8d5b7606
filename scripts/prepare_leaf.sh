#!/usr/bin/env bash
# Gets the natural federated datasets (FEMNIST by writer, Shakespeare by role) on a machine with internet, as the
# files fedspa-jax reads (docs/data.md, "Natural datasets"), for use there or for copying to a machine without:
#
#   bash scripts/prepare_leaf.sh femnist shakespeare      # LEAF's preprocessing, into ./natural_data/leaf
#   bash scripts/prepare_leaf.sh tff                      # TFF's HDF5 files, into ./natural_data/tff
#   SF=1.0 bash scripts/prepare_leaf.sh femnist           # all of FEMNIST (default --sf 0.05; Shakespeare 0.2)
#
# femnist / shakespeare: clones https://github.com/TalwalkarLab/leaf into $NATURAL_OUT/leaf (once) and runs LEAF's
# own preprocessing there, which downloads the raw data (NIST SD19 for FEMNIST, several GB; Project Gutenberg for
# Shakespeare) and writes data/train/*.json and data/test/*.json:
#   femnist:     ./preprocess.sh -s niid --sf $SF -k 0 -t sample            (SF default 0.05)
#   shakespeare: ./preprocess.sh -s niid --sf $SF -k 0 -t sample --tf 0.8   (SF default 0.2)
# LEAF's scripts need python3 with numpy and pillow, wget and unzip. tff: downloads TFF's archives (the ones
# tff.simulation.datasets downloads) from https://storage.googleapis.com/tff-datasets-public/, checks their sha256
# and unpacks fed_emnist_{train,test}.h5, fed_emnist_digitsonly_{train,test}.h5, shakespeare_{train,test}.h5.
# Files go under $NATURAL_OUT (default ./natural_data); at the end it prints the folders to pass as --data-dir.
set -euo pipefail

if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  [ $# -eq 0 ] && exit 2 || exit 0
fi
for name in "$@"; do
  case "$name" in
    femnist|shakespeare|tff) ;;
    *) echo "prepare_leaf: unknown name '$name'; known: femnist, shakespeare, tff" >&2; exit 2 ;;
  esac
done

OUT="${NATURAL_OUT:-$PWD/natural_data}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ready=()

leaf() {  # $1: dataset, $2: default --sf, $3...: further preprocess.sh flags
  local name="$1" sf="${SF:-$2}"
  shift 2
  if [ ! -d "$OUT/leaf/.git" ]; then
    git clone --depth 1 https://github.com/TalwalkarLab/leaf "$OUT/leaf"
  fi
  if compgen -G "$OUT/leaf/data/$name/data/train/*.json" > /dev/null; then
    echo "prepare_leaf: $OUT/leaf/data/$name/data/train already holds files (delete data/ except raw_data to redo)" >&2
  else
    (cd "$OUT/leaf/data/$name" && ./preprocess.sh -s niid --sf "$sf" -k 0 -t sample "$@")
  fi
  ready+=("$name: --data-dir $OUT/leaf/data/$name   (format leaf)")
}

tff() {
  mkdir -p "$OUT/tff"
  local base=https://storage.googleapis.com/tff-datasets-public
  # sha256 of each archive, as tff.simulation.datasets checks them.
  local archives=(
    "fed_emnist fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0"
    "fed_emnist_digitsonly 55333deb8546765427c385710ca5e7301e16f4ed8b60c1dc5ae224b42bd5b14b"
    "shakespeare 0285be9906cb5f268092eee4edeeacfc2af4574f2941f7cc2f08a321d7f5c707"
  )
  for entry in "${archives[@]}"; do
    set -- $entry
    local file="$OUT/tff/$1.tar.bz2"
    if [ ! -f "$OUT/tff/$1_train.h5" ]; then
      if [ ! -f "$file" ]; then
        curl -fL --retry 3 -o "$file.part" "$base/$1.tar.bz2"
        mv "$file.part" "$file"
      fi
      echo "$2  $file" | sha256sum -c --quiet -
      tar -C "$OUT/tff" -xjf "$file"
    fi
  done
  ready+=("femnist, shakespeare: --data-dir $OUT/tff   (format tff; femnist digits only: --set data.only_digits=true)")
}

for name in "$@"; do
  case "$name" in
    femnist) leaf femnist 0.05 ;;
    shakespeare) leaf shakespeare 0.2 --tf 0.8 ;;
    tff) tff ;;
  esac
done

echo "Prepared in $OUT:"
for line in "${ready[@]}"; do echo "  $line"; done
echo "e.g. fedspa-jax run --config femnist_natural --data-dir $OUT/leaf/data/femnist"
echo "To use them on another machine, copy only what is read: a LEAF dataset's data/train and data/test folders"
echo "(keep them side by side), or the .h5 files; pass the folder holding them as --data-dir there."
