#!/usr/bin/env bash
# Build and install malpi_ros into a venv that holds ROS 2 from pip wheels, laid out the way
# `colcon build --merge-install` lays out an install prefix: the Python package (our sources and
# the generated messages) in lib/pythonX.Y/site-packages/malpi_ros, the node executables in
# lib/malpi_ros/, launch/ and config/ in share/malpi_ros/, the ament index entry.
#
# Usage: tools/build.sh VENV_DIR BUILD_DIR
# On a robot with apt ROS 2 use colcon instead (README "On the robot"); this script exists only
# because here the ROS packages come from pip (the include-path fix below is for that case).
set -euo pipefail

venv=$(cd "${1:?venv dir}" && pwd)
build=${2:?build dir}
src=$(cd "$(dirname "$0")/.." && pwd)

export AMENT_PREFIX_PATH="$venv"
export PATH="$venv/bin:$PATH"

cmake -S "$src" -B "$build" \
  -DCMAKE_INSTALL_PREFIX="$venv" \
  -DPython3_EXECUTABLE="$venv/bin/python" \
  -DBUILD_TESTING=OFF \
  -DCMAKE_PROJECT_INCLUDE="$src/cmake/pip_ros_include_fix.cmake" \
  >"$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" >"$build.build.log" 2>&1 || { tail -50 "$build.build.log"; exit 1; }
# cmake --install only adds and overwrites: a module moved or deleted in the sources would live
# on in the installed copy and hide a broken import (or a moved config file). Install the
# package, its launch files and config afresh each time.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$site/malpi_ros" "$venv/share/malpi_ros/launch" "$venv/share/malpi_ros/config"
cmake --install "$build" >"$build.install.log" 2>&1 || { cat "$build.install.log"; exit 1; }
echo "malpi_ros installed into $venv"
