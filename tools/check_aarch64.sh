#!/usr/bin/env bash
# The robot runtime on aarch64, checked under emulation: the same bundle stepped over the same
# frames in an arm64 Debian root (qemu-user) and here on x86_64, compared. README "aarch64".
#
# Usage: tools/check_aarch64.sh BUNDLE            (as root; ~20 min the first time, then ~2 min)
#   ARM64_ROOT  the arm64 root (default /var/tmp/malpi_arm64; outside the repo, reused)
#   FRAMES      frames to step (default 200)    PY  the x86_64 python (default .venv/bin/python)
#
# Needs the Debian packages qemu-user-static and debootstrap. binfmt_misc is not needed (a
# container often lacks it): the static qemu binary is copied into the root and runs its
# python directly under chroot, and debootstrap's first stage is used with the packages
# unpacked by dpkg-deb (no maintainer scripts run; none are needed to run python). pip inside
# the root installs the aarch64 wheels of the versions pinned in constraints.txt: ai-edge-litert,
# numpy, opencv-python-headless (no TensorFlow, no rclpy: the robot runtime imports neither).
# fp32: probabilities within 1e-5 and identical actions, or exit 1. int8 (if the bundle has
# it): identical actions, the probability difference reported. Emulated timings are not a Pi's.
set -euo pipefail

bundle=$(realpath "${1:?usage: tools/check_aarch64.sh BUNDLE}")
repo=$(cd "$(dirname "$0")/.." && pwd)
root=${ARM64_ROOT:-/var/tmp/malpi_arm64}
frames=${FRAMES:-200}
py=${PY:-$repo/.venv/bin/python}
suite=bookworm  # Debian 12: python 3.11, as here
mirror=http://deb.debian.org/debian
packages=(ai-edge-litert numpy opencv-python-headless)
started=$SECONDS

for tool in qemu-aarch64-static debootstrap dpkg-deb chroot; do
  command -v "$tool" >/dev/null || {
    echo "check_aarch64: $tool not found: apt-get install qemu-user-static debootstrap" >&2
    exit 2
  }
done
[ "$(id -u)" = 0 ] || { echo "check_aarch64: needs root (debootstrap, chroot)" >&2; exit 2; }
[ -f "$bundle/metadata.json" ] || { echo "check_aarch64: $bundle is not a bundle" >&2; exit 2; }

arm() {  # run the root's python under qemu, with nothing of this machine's environment
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    PYTHONPATH=/opt/malpi:/tmp/malpi_check/src \
    chroot "$root" /usr/bin/qemu-aarch64-static /usr/bin/python3 "$@"
}

if [ ! -x "$root/usr/bin/python3" ]; then
  echo "== arm64 Debian $suite root in $root (debootstrap, first stage)"
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,python3-pip \
    "$suite" "$root" "$mirror" >"$root.debootstrap.log" 2>&1 ||
    { tail -20 "$root.debootstrap.log"; exit 1; }
  for deb in "$root"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$root"; done
fi
cp /usr/bin/qemu-aarch64-static "$root/usr/bin/"
# XNNPACK (the robot's kernels) asks cpuinfo for the CPU: without /proc/cpuinfo and the CPU lists
# in /sys it fails ("Error in cpuinfo") and LiteRT silently runs its builtin kernels instead.
# The root gets plain files in their place describing a Raspberry Pi 4's CPU (2 of its 4
# Cortex-A72 cores: NEON, no dot product), so the kernels the Pi would use are the ones checked.
mkdir -p "$root/proc" "$root/sys/devices/system/cpu"
echo 0-1 >"$root/sys/devices/system/cpu/possible"
echo 0-1 >"$root/sys/devices/system/cpu/present"
for cpu in 0 1; do
  printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$cpu"
  printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n'
  printf 'CPU revision\t: 3\n\n'
done >"$root/proc/cpuinfo"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
arm -c 'import platform; assert platform.machine() == "aarch64", platform.machine()'

# The pinned versions, from constraints.txt (the same file make test installs from).
pins=()
for name in "${packages[@]}"; do
  pin=$(grep -i -E "^${name}==" "$repo/constraints.txt") || {
    echo "check_aarch64: $name is not pinned in constraints.txt" >&2; exit 2; }
  pins+=("$pin")
done
stamp="$root/opt/malpi/.pins"
if [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
  echo "== pip (aarch64, emulated): ${pins[*]}"
  rm -rf "$root/opt/malpi"
  cp "$repo/constraints.txt" "$root/tmp/constraints.txt"
  arm -m pip install --quiet --no-cache-dir --target /opt/malpi --only-binary=:all: \
    --cert /etc/ssl/certs/ca-certificates.crt -c /tmp/constraints.txt "${pins[@]}"
  echo "${pins[*]}" >"$stamp"
fi

work="$root/tmp/malpi_check"
rm -rf "$work" && mkdir -p "$work/src"
(cd "$repo" && find malpi_ros -name '*.py' -exec cp --parents {} "$work/src/" \;)
cp "$repo/tools/aarch64_step.py" "$work/"
cp -r "$bundle" "$work/bundle"
arm -c 'import sys; import ai_edge_litert, cv2, numpy; import malpi_ros.runtime.policy
assert "tensorflow" not in sys.modules and "rclpy" not in sys.modules
print("aarch64 runtime: numpy", numpy.__version__, "opencv", cv2.__version__)'
# The check must run what the robot runs: XNNPACK, not the fallback kernels.
arm -c 'from malpi_ros.runtime.litert import LiteRTStep
LiteRTStep("/tmp/malpi_check/bundle/step.tflite", num_threads=1)' 2>&1 |
  grep -q 'XNNPACK delegate' || { echo "check_aarch64: XNNPACK did not start on aarch64" >&2; exit 1; }

"$py" "$repo/tools/aarch64_step.py" frames "$work/frames.npy" --count "$frames"
precisions=(fp32)
grep -q '"step_int8.tflite"' "$bundle/metadata.json" && precisions+=(int8)
status=0
for precision in "${precisions[@]}"; do
  echo "== $precision"
  "$py" "$repo/tools/aarch64_step.py" step "$bundle" "$work/frames.npy" "$precision" \
    "$work/x86_64_$precision.npz"
  arm /tmp/malpi_check/aarch64_step.py step /tmp/malpi_check/bundle /tmp/malpi_check/frames.npy \
    "$precision" "/tmp/malpi_check/aarch64_$precision.npz"
  report=()
  [ "$precision" = int8 ] && report=(--report-only)
  "$py" "$repo/tools/aarch64_step.py" compare "$work/x86_64_$precision.npz" \
    "$work/aarch64_$precision.npz" "${report[@]}" || status=1
done
echo "check_aarch64: $([ $status = 0 ] && echo passed || echo FAILED) in $((SECONDS - started)) s" \
  "(aarch64 under qemu: its timings are not a Pi's)"
exit $status
