#!/usr/bin/env bash
# Installs what Sluice needs to build, test and run on a Debian machine of this
# kind. Idempotent: each step checks first and says what it does; a second run
# is a no-op in seconds. Versions are pinned here and in rust-toolchain.toml.
set -euo pipefail

STABLE=1.99.1                  # host crates (aya 0.16 needs rustc >= 1.98)
NIGHTLY=nightly-2026-10-30     # eBPF crate: -Z build-std=core needs nightly + rust-src
BPF_LINKER=0.13.0
LLVM_MAJOR=23                  # must equal the LLVM major of $NIGHTLY (checked below)
KUBERNETES_VALIDATE=1.37.0     # PyPI: deploy/ checked offline against Kubernetes schemas (tests/tests/deploy.rs)
TOOLS_DIR="${SLUICE_TOOLS_DIR:-$HOME/.local/share/sluice-tools}"
APT_PKGS=(iproute2 iputils-ping nftables conntrack iperf3 socat tcpdump bpftool containernetworking-plugins sockperf iptables ipset gnuplot-nox containerd runc busybox-static skopeo protobuf-compiler)

say() { printf 'setup: %s\n' "$*"; }

have_toolchain() { rustup run "$1" rustc --version >/dev/null 2>&1; }

if ! have_toolchain "$STABLE"; then
  say "installing Rust $STABLE"
  rustup toolchain install "$STABLE" --profile minimal --component rust-src,clippy,rustfmt --no-self-update
fi
# A machine image may ship the toolchain without them (rust-toolchain.toml
# lists them, but rustup adds them only when it installs the toolchain).
if ! rustup component list --toolchain "$STABLE" --installed | grep -q '^clippy' ||
   ! rustup component list --toolchain "$STABLE" --installed | grep -q '^rustfmt'; then
  say "adding clippy and rustfmt to Rust $STABLE"
  rustup component add --toolchain "$STABLE" rust-src clippy rustfmt
fi
if ! have_toolchain "$NIGHTLY" || [ ! -d "$(rustc +"$NIGHTLY" --print sysroot)/lib/rustlib/src" ]; then
  say "installing Rust $NIGHTLY with rust-src"
  rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src --no-self-update
fi

got_major=$(rustc +"$NIGHTLY" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if [ "$got_major" != "$LLVM_MAJOR" ]; then
  echo "setup: $NIGHTLY has LLVM $got_major, bpf-linker is pinned to llvm-$LLVM_MAJOR" >&2
  exit 1
fi

# bpf-linker: the stock build wants a system libLLVM that Debian lacks. Link it
# against the libLLVM the nightly ships, copied out so that a later rustup
# update cannot pull it from under the rpath (shared/TOOLCHAIN.md).
linker="$HOME/.cargo/bin/bpf-linker"
if ! { [ -x "$linker" ] && "$linker" --version 2>/dev/null | grep -q "$BPF_LINKER"; }; then
  say "building bpf-linker $BPF_LINKER against the LLVM $LLVM_MAJOR of $NIGHTLY"
  sysroot=$(rustc +"$NIGHTLY" --print sysroot)
  lib="$TOOLS_DIR/llvm-$LLVM_MAJOR/lib"
  mkdir -p "$lib"
  so=$(cd "$sysroot/lib" && ls libLLVM.so.* | head -n1)
  cp -f "$sysroot/lib/$so" "$lib/"
  ln -sf "$so" "$lib/libLLVM.so"
  RUSTFLAGS="-L $lib -C link-arg=-Wl,-rpath,$lib" \
    cargo +"$STABLE" install bpf-linker --version "$BPF_LINKER" --locked \
      --no-default-features --features "llvm-$LLVM_MAJOR"
fi

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then echo "setup: need root for apt-get" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! { command -v kubernetes-validate >/dev/null 2>&1 \
       && [ "$(kubernetes-validate --version 2>/dev/null)" = "$KUBERNETES_VALIDATE" ]; }; then
  say "installing kubernetes-validate $KUBERNETES_VALIDATE (pip)"
  python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE"
fi

if ! cargo +"$STABLE" nextest --version >/dev/null 2>&1; then
  say "cargo-nextest missing: tests fall back to cargo test"
fi
say "ok (rust $STABLE, $NIGHTLY, bpf-linker $BPF_LINKER)"
