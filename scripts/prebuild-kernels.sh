#!/usr/bin/env bash
# Copies the cubins of the release build (the very ones the npm package's .node embeds)
# into crates/mla-kernels/prebuilt/, with their ptxas reports, build.rs's manifest and a
# snapshot of kernels/ (the sources they were built from). The packaged crate ships that
# folder, so a Rust user builds mla-kernels without any CUDA compiler; build.rs uses it only
# while it matches the kernel sources. prebuilt/ is git-ignored (about 5 MB of cubins and PTX).
#
#   bash scripts/prebuild-kernels.sh      (part of `npm run package`; needs `npm run build`)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
die() { echo "prebuild-kernels: $*" >&2; exit 1; }

# napi build --platform builds for the explicit host triple (target/<triple>/release): ask
# cargo for the same unit, which is fresh after `npm run build`, and read its OUT_DIR.
triple=$(rustc -vV | sed -n 's/^host: //p')
out_dir=$(cargo build --release --target "$triple" -p mla-kernels --message-format=json 2>/dev/null \
  | node -e '
      let out = ""
      require("readline").createInterface({ input: process.stdin }).on("line", (l) => {
        try { const m = JSON.parse(l); if (m.reason === "build-script-executed" && m.package_id.includes("mla-kernels")) out = m.out_dir } catch {}
      }).on("close", () => { if (!out) process.exit(1); console.log(out) })') \
  || die "cargo did not report the OUT_DIR of mla-kernels (does 'cargo build --release -p mla-kernels' work?)"
manifest=$out_dir/MANIFEST.txt
[[ -f $manifest ]] || die "$manifest is missing (an older build.rs?)"
grep -q '^module ' "$manifest" || die "this build has no GPU kernels (see gpuStatus().reason; run scripts/install-cuda.sh): refusing to package a crate without cubins"

dest=crates/mla-kernels/prebuilt
rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
cp "$manifest" "$out_dir/ptxas.log" "$dest.tmp/"
# One line per (module, target): "module common/plan/mla_plan sm_86" -> common/plan/mla_plan.sm_86.cubin
# (compute_80: .ptx) and its report.
while read -r _ name arch; do
  ext=cubin; [[ $arch == compute_* ]] && ext=ptx
  mkdir -p "$dest.tmp/$(dirname "$name")"
  cp "$out_dir/$name.$arch.$ext" "$out_dir/$name.$arch.ptxas.txt" "$dest.tmp/$(dirname "$name")/"
done < <(grep '^module ' "$manifest")
# The sources the cubins were built from (rebuilding from the packaged crate uses them).
mkdir -p "$dest.tmp/kernels"
(cd kernels && find . -type f ! -name '.*' -print0 | xargs -0 cp --parents -t "../$dest.tmp/kernels")
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "prebuild-kernels: $(grep -c '^module ' "$dest/MANIFEST.txt") modules for $(awk '/^module / {print $3}' "$dest/MANIFEST.txt" | sort -u | paste -sd, -) ($(sed -n 's/^compiler //p' "$dest/MANIFEST.txt")), $(du -sh "$dest" | cut -f1) in $dest"
