#!/bin/bash
# The real model's GGUF (98 MB) is larger than what one device call carries (64 MiB), so it
# travels xz-compressed in two parts over two back-to-back calls; /tmp on the device survives
# between calls while the machine stays warm (30 s idle).
#
#   bash examples/research/gguf_parts.sh stash 00      # call 1: carry .gguf/smol.gguf.xz.part00
#   bash examples/research/gguf_parts.sh stash 01      # call 2: carry .gguf/smol.gguf.xz.part01
#   bash examples/research/gguf_parts.sh assemble      # prints the GGUF's path, or fails
#
# Made here with (xz 5.4; the parts' checksums depend on the xz version): xz -9 -T1 -c SmolLM2-135M-Instruct.Q4_1.gguf | split -b 45233916 -d - \
#   .gguf/smol.gguf.xz.part   (.gguf/ is in .git/info/exclude)
set -eu
DIR=/tmp/gguf
declare -A SHA=(
  [00]=ce59a356b1bb298ae7757352391d40c2814cde1d8818dff1e57eb18dd7dc8a11
  [01]=bedc453af514accc0fce5c6ed8e2c65a13a3feaaa6fafeaa3a6c77eb81603f8b
)
check() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
mkdir -p $DIR
case ${1:?stash NN | assemble} in
  stash)
    part=.gguf/smol.gguf.xz.part${2:?part number}
    check "$part" "${SHA[$2]}" || { echo "gguf_parts: $part missing or its checksum is off" >&2; exit 1; }
    cp "$part" $DIR/ && echo "gguf_parts: stashed $part in $DIR" >&2 ;;
  assemble)
    for n in "${!SHA[@]}"; do
      check $DIR/smol.gguf.xz.part$n "${SHA[$n]}" \
        || { echo "gguf_parts: part $n not in $DIR (did the machine go cold?)" >&2; exit 1; }
    done
    out=$DIR/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -f $out ] || cat $DIR/smol.gguf.xz.part* | python3 -c \
      "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), open('$out', 'wb'))"
    echo $out ;;
  *) echo "gguf_parts: unknown command $1" >&2; exit 2 ;;
esac
