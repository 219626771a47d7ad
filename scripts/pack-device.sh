#!/usr/bin/env bash
# Packs .device/bin (after scripts/prepare-device.sh and scripts/build-variants.sh) into
# .device/bins.tar.xz: ten test and bench binaries are ~65 MB, over the device tool's 64 MiB,
# and ~6 MB packed. scripts/gpu-suite.sh unpacks it there.
set -euo pipefail
cd "$(dirname "$0")/../.device"
tar -cJf bins.tar.xz bin && rm -rf bin
du -sh .
