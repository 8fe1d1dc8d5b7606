#!/usr/bin/env bash
# Prepares TFDS datasets in the array_record format that fedspa-jax reads without TensorFlow, on a machine with
# internet, for copying to one without (docs/data.md):
#
#   bash scripts/prepare_tfds.sh cifar10 cifar100 emnist/letters        # into ./tfds_data
#   TFDS_OUT=/data/tfds bash scripts/prepare_tfds.sh emnist_byclass
#
# Names are TFDS names (cifar10, cifar100, emnist/letters, emnist/byclass, any other) or fedspa-jax's
# (emnist_letters, emnist_byclass). Each is built as `tfds build NAME --file_format=array_record` would. TFDS
# needs TensorFlow to prepare image datasets (it encodes the images with tf.image), so the build runs in a virtual
# environment of its own, $TFDS_OUT/.venv-prepare, made on first use with ${FEDSPA_PYTHON:-python3} (tensorflow,
# tensorflow-datasets and the array_record reader), unless PREPARE_PYTHON names an interpreter that has them.
# Set TFDS_VERSION to the offline machine's tensorflow-datasets version (`pip show tensorflow-datasets`): it decides
# the dataset's version folder. Downloads are kept in $TFDS_OUT/downloads (reruns reuse them); they need not be
# copied. At the end it prints the folders to copy and a command that copies them.
set -euo pipefail

if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  [ $# -eq 0 ] && exit 2 || exit 0
fi

OUT="${TFDS_OUT:-$PWD/tfds_data}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

names=()
for name in "$@"; do
  case "$name" in
    emnist_letters) names+=(emnist/letters) ;;
    emnist_byclass) names+=(emnist/byclass) ;;
    tfds:*) names+=("${name#tfds:}") ;;
    *) names+=("$name") ;;
  esac
done

if [ -n "${PREPARE_PYTHON:-}" ]; then
  PY="$PREPARE_PYTHON"
else
  VENV="$OUT/.venv-prepare"
  PACKAGES=(tensorflow "tensorflow-datasets${TFDS_VERSION:+==$TFDS_VERSION}" array-record importlib-resources pillow)
  STAMP="$VENV/.prepare-installed"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "prepare_tfds: creating $VENV" >&2
    "${FEDSPA_PYTHON:-python3}" -m venv "$VENV"
  fi
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "${PACKAGES[*]}" ]; then
    echo "prepare_tfds: installing ${PACKAGES[*]} into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet "${PACKAGES[@]}" >&2
    echo "${PACKAGES[*]}" > "$STAMP"
  fi
  PY="$VENV/bin/python"
fi

if ! "$PY" -c "import tensorflow, tensorflow_datasets" 2>/dev/null; then
  echo "prepare_tfds: $PY cannot import tensorflow and tensorflow_datasets; TFDS needs both to prepare image datasets" >&2
  exit 1
fi
echo "prepare_tfds: tensorflow-datasets $("$PY" -c 'import tensorflow_datasets as t; print(t.__version__)'), data in $OUT" >&2

# What `tfds build NAME --file_format=array_record` does; its command line also imports apache_beam (4.9.10).
folders="$("$PY" - "$OUT" "${names[@]}" <<'EOF'
import os, sys
import tensorflow_datasets as tfds

out, folders = sys.argv[1], []
sys.stdout = sys.stderr  # TFDS's progress goes to stdout; only the folders go there
for name in sys.argv[2:]:
  print(f"prepare_tfds: building {name}")
  builder = tfds.builder(name, data_dir=out)
  builder.download_and_prepare(file_format="array_record", download_dir=os.path.join(out, "downloads"))
  if builder.info.file_format.value != "array_record":
    sys.exit(f"prepare_tfds: {builder.data_dir} holds {name} as {builder.info.file_format.value}, not array_record;"
             f" move it away and run again")
  folders.append(os.path.relpath(builder.data_dir, out))
print(*folders, sep="\n", file=sys.__stdout__)
EOF
)"

echo
echo "Prepared in $OUT (array_record):"
for folder in $folders; do
  echo "  $OUT/$folder"
done
echo "Copy each folder to the same place under the offline machine's TFDS data folder (fedspa-jax's data_dir /"
echo "--data-dir, else \$TFDS_DATA_DIR, else ~/tensorflow_datasets), e.g. over ssh:"
echo "  tar -C $OUT -cf - $(echo $folders) | ssh HOST 'mkdir -p ~/tensorflow_datasets && tar -C ~/tensorflow_datasets -xf -'"
