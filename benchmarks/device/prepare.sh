#!/usr/bin/env bash
# Run HERE (the project machine, not the device), once per checkout: makes the three ignored
# folders every device call carries (`carry: [".gl", ".whl", ".gymr", ...]`) and that setup.sh
# unpacks there. A new checkout does not have them (ignored folders do not travel with the
# repository), and the device machine reaches no package index.
#   .gl/          GL loader packages (Debian amd64 .deb) for headless EGL rendering with MuJoCo
#   .whl/dev/     wheels for the device's CPython 3.12 of what its image lacks (pins: constraints.txt)
#   .gymr/        a stub gymnasium_robotics holding only the Franka meshes the scene draws
#                 (the whole wheel is 26 MB of the 64 MB a call may carry)
# Needs the Quickstart's environment (.venv, made by `make test` or `make demo`) for the meshes.
#
#   bash benchmarks/device/prepare.sh
set -eo pipefail
cd "$(git rev-parse --show-toplevel)"
for folder in .gl .whl .gymr; do
  grep -qxF "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
done

if ! ls .gl/*.deb >/dev/null 2>&1; then
  mkdir -p .gl /tmp/amd64/partial
  apt_options=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
  apt-get "${apt_options[@]}" update -qq
  (cd .gl && apt-get "${apt_options[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi

pin() { grep -E "^$1==" constraints.txt | head -1; }
mkdir -p .whl/dev
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform any -d .whl/dev \
  "$(pin mujoco)" "mujoco-core==$(pin mujoco | cut -d= -f3)" "$(pin gymnasium)" farama-notifications pyopengl glfw

python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || { echo "prepare.sh: $python not found; run 'make test' first (it builds .venv)"; exit 2; }
meshes=$("$python" -c "from llarva_gym.backends.mujoco.scene import franka_mesh_dir; print(franka_mesh_dir())")
stub=.gymr/gymnasium_robotics/envs/assets/kitchen_franka/franka_assets/meshes
mkdir -p "$stub/collision"
cp "$meshes"/collision/*.stl "$stub/collision/"

du -sh .gl .whl .gymr
ls .whl/dev
