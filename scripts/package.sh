#!/usr/bin/env bash
# `npm run package`: builds the release binary and the TypeScript, then writes both npm
# tarballs into packages/ (git-ignored):
#
#   packages/mla-decode-<v>.tgz                 dist/, binding.js: the API, no binary
#   packages/mla-decode-linux-x64-gnu-<v>.tgz   the .node (the platform package)
#
# checks what each holds, and runs `npm publish --dry-run` on both (any npm warning fails).
# With a kernel build it also fills crates/mla-kernels/prebuilt/ from the same build
# (scripts/prebuild-kernels.sh), so that the Rust crate carries the very cubins the .node
# embeds. MLA_PACKAGE_NO_BUILD=1 skips `npm run build` (use the build that is there).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
die() { echo "package: $*" >&2; exit 1; }
node_file=mla-decode.linux-x64-gnu.node
platform_dir=npm/linux-x64-gnu

if [[ ${MLA_PACKAGE_NO_BUILD:-0} != 1 ]]; then
  echo "== npm run build (release)"
  npm run build
fi
for f in "$node_file" binding.js binding.d.ts dist/index.js dist/index.d.ts dist/cli.js dist/src/native.js dist/src/device.d.ts dist/src/cli/main.js; do
  [[ -f $f ]] || die "$f is missing: run 'npm run build' first"
done
version=$(node -p "require('./package.json').version")
[[ $(node -p "require('./$platform_dir/package.json').version") == "$version" ]] || die "$platform_dir/package.json is not at version $version"
[[ $(node -p "require('./package.json').optionalDependencies['mla-decode-linux-x64-gnu']") == "$version" ]] \
  || die "optionalDependencies must pin mla-decode-linux-x64-gnu@$version"

if [[ $(node -p "String(require('./dist').gpuStatus().kernelsBuilt)") == true ]]; then
  echo "== prebuilt cubins for the Rust crate"
  bash scripts/prebuild-kernels.sh
else
  echo "package: WARNING: this build has no GPU kernels (CPU-only): the tarballs work on the CPU backend only, and crates/mla-kernels/prebuilt/ is not filled" >&2
fi

mkdir -p packages
main_tgz=packages/mla-decode-$version.tgz
plat_tgz=packages/mla-decode-linux-x64-gnu-$version.tgz
rm -f "$main_tgz" "$plat_tgz"

echo "== pack mla-decode-linux-x64-gnu@$version"
# The .node goes next to the platform package.json (git-ignored there, *.node); its
# prepack script refuses to pack without it.
cp "$node_file" "$platform_dir/$node_file"
(cd "$platform_dir" && npm pack --silent --pack-destination "$root/packages" >/dev/null)
echo "== pack mla-decode@$version"
npm pack --silent --pack-destination packages >/dev/null
[[ -f $main_tgz && -f $plat_tgz ]] || die "npm pack did not write $main_tgz and $plat_tgz"

# What each tarball must (and must not) hold.
tar -tzf "$plat_tgz" > packages/.platform-files
tar -tzf "$main_tgz" > packages/.main-files
grep -qx "package/$node_file" packages/.platform-files || die "$plat_tgz has no $node_file"
cmp -s <(tar -xzOf "$plat_tgz" "package/$node_file") "$node_file" || die "$plat_tgz holds another $node_file than the build's"
! grep -q '\.node$' packages/.main-files || die "$main_tgz must not carry a .node (it belongs to the platform package)"
for f in package/dist/index.js package/dist/index.d.ts package/dist/cli.js package/dist/src/native.js package/dist/src/device.js package/dist/src/device.d.ts package/dist/src/cli/main.js package/binding.js package/binding.d.ts package/package.json; do
  grep -qx "$f" packages/.main-files || die "$main_tgz lacks $f"
done
rm -f packages/.platform-files packages/.main-files

echo "== npm publish --dry-run (both)"
for t in "$plat_tgz" "$main_tgz"; do
  log=$(npm publish --dry-run --tag latest "./$t" 2>&1) || { echo "$log" >&2; die "npm publish --dry-run $t failed"; }
  # Not being logged in is this machine's state, not the package's: that one line is not counted.
  if grep -iE '^npm (warn|error)' <<<"$log" | grep -qv 'requires you to be logged in'; then
    echo "$log" >&2
    die "npm publish --dry-run $t is not clean (warnings above)"
  fi
  echo "   $t: $(grep -oE 'total files: *[0-9]+' <<<"$log" | tr -s ' '), $(grep -oE 'package size: *[0-9.]+ [kMG]?B' <<<"$log" | tr -s ' '): clean"
done
ls -l "$main_tgz" "$plat_tgz"
echo "package: ok"
