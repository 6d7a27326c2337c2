#!/usr/bin/env bash
# What a Vulkan build of llava-kv needs on Debian or Ubuntu, installed with apt: the shader compiler
# (glslc), SPIR-V headers, the Vulkan loader, Vulkan headers new enough for the pinned ggml-vulkan, and
# Mesa's Vulkan drivers (lavapipe, a conformant Vulkan device that runs on the CPU, comes with them).
#
#   sudo scripts/vulkan_deps.sh            # installs, then prints the CMAKE_ARGS line for pip on stdout
#   CMAKE_ARGS="$(sudo scripts/vulkan_deps.sh)" pip install .
#
# The pinned ggml-vulkan uses vk::LayerSettingEXT (VK_EXT_layer_settings), which Debian 12's Vulkan
# headers (1.3.239) lack. Where the system's headers lack it, the headers of the next Debian release's
# libvulkan-dev are unpacked into a private folder (headers only: the system's loader, libc and compiler
# stay as they are) and passed to CMake. On Debian 12 Mesa's drivers come from bookworm-backports
# (25.x: lavapipe reports its memory budget; 22.3 reports free == total). Both come from the Debian
# archive this machine's apt already uses, through private package lists: the system's apt sources are
# not changed. Logs go to stderr; the only line on stdout is the CMAKE_ARGS value.
set -euo pipefail

cache="${LLAVA_KV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llava-kv}"
headers="$cache/vulkan-headers"
log() { echo "vulkan_deps: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "run as root (apt-get install): sudo $0"
  exit 1
fi
. /etc/os-release
apt_quiet=(-y -qq -o Dpkg::Use-Pty=0)
export DEBIAN_FRONTEND=noninteractive

# The Debian archive apt already uses (deb822 or one-line sources), for the private lists below.
debian_uri() {
  local uri
  uri=$(awk '/^URIs:/ && !/security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  if [ -z "$uri" ]; then
    uri=$(awk '$1 == "deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  echo "$uri"
}

# apt-get with package lists of its own for `suites` (the system's sources stay untouched).
private_apt() {
  local suites="$1"; shift
  local dir="$cache/apt-${suites// /-}"
  mkdir -p "$dir/lists/partial"
  : > "$dir/sources.list"
  for suite in $suites; do
    echo "deb $(debian_uri) $suite main" >> "$dir/sources.list"
  done
  local opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$dir/lists" -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
  if [ ! -f "$dir/updated" ] || [ -n "$(find "$dir/updated" -mmin +1440)" ]; then
    apt-get "${opts[@]}" update -qq >&2
    touch "$dir/updated"
  fi
  apt-get "${opts[@]}" "$@"
}

packages=(glslc spirv-headers libvulkan1 mesa-vulkan-drivers)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get install "${apt_quiet[@]}" "${missing[@]}" >&2 || {
    apt-get update -qq >&2
    apt-get install "${apt_quiet[@]}" "${missing[@]}" >&2
  }
fi

if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
  mesa=$(dpkg-query -W -f '${Version}' mesa-vulkan-drivers)
  if dpkg --compare-versions "$mesa" lt 25; then
    log "mesa-vulkan-drivers $mesa: installing the bookworm-backports release"
    private_apt "bookworm bookworm-backports" install "${apt_quiet[@]}" -t bookworm-backports \
      mesa-vulkan-drivers >&2
  fi
fi

include=/usr/include
if ! grep -qs LayerSettingEXT /usr/include/vulkan/vulkan_structs.hpp; then
  include="$headers/usr/include"
  if ! grep -qs LayerSettingEXT "$include/vulkan/vulkan_structs.hpp"; then
    next=trixie
    log "the system's Vulkan headers lack VK_EXT_layer_settings: unpacking $next's libvulkan-dev into $headers"
    tmp=$(mktemp -d)
    (cd "$tmp" && chmod 777 . && private_apt "$next" download libvulkan-dev >&2)
    rm -rf "$headers"
    dpkg -x "$tmp"/libvulkan-dev_*.deb "$headers"
    rm -rf "$tmp"
  fi
fi

# (awk reads all of ldconfig's list: leaving at the first match would cut ldconfig off, a SIGPIPE that
# pipefail turns into a failure)
loader=$(ldconfig -p | awk '/libvulkan\.so\.1 / && /x86-64|aarch64|64bit/ && !found {print $NF; found = 1}')
loader=${loader:-$(ldconfig -p | awk '/libvulkan\.so\.1 / && !found {print $NF; found = 1}')}
args="-DGGML_VULKAN=ON"
if [ "$include" != /usr/include ]; then
  args="$args -DVulkan_INCLUDE_DIR=$include"
fi
if [ ! -e /usr/lib/x86_64-linux-gnu/libvulkan.so ] && [ ! -e /usr/lib/aarch64-linux-gnu/libvulkan.so ]; then
  args="$args -DVulkan_LIBRARY=$loader"
fi
echo "$args"
