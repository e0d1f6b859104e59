#!/bin/bash
# The real model's GGUF (98 MB) is larger than what one device call carries (64 MiB), so it
# travels xz-compressed in two parts over two back-to-back calls; /tmp on the device survives
# between calls while the machine stays warm (30 s idle).
#
#   bash examples/research/gguf_parts.sh stash 00      # call 1: carry .gguf/smol.gguf.xz.part00
#   bash examples/research/gguf_parts.sh stash 01      # call 2: carry .gguf/smol.gguf.xz.part01
#   bash examples/research/gguf_parts.sh assemble      # prints the GGUF's path, or fails
#
# Made here with: xz -9 -c SmolLM2-135M-Instruct.Q4_1.gguf | split -b 45233916 -d - \
#   .gguf/smol.gguf.xz.part   (.gguf/ is in .git/info/exclude)
set -eu
DIR=/tmp/gguf
declare -A SHA=(
  [00]=15e5eb1fb52f967bad5ed14a41bb572150d7395bd41aecf06899711232e93baa
  [01]=894baccda92b3d7d47f508aef9457adf0639bfdca6576f743217044e5447c785
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
