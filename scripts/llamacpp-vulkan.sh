#!/usr/bin/env bash
# Builds llama-cpp-python with llama.cpp's Vulkan backend into a folder of its own, for
# recording the f32 llama.cpp reference that the SmolLM2 test compares tokens with
# (infer/tests/fixtures/smollm2_llamacpp_vulkan.json). Not needed to run the tests.
#
#   bash scripts/llamacpp-vulkan.sh [DEST]      (default ~/.cache/hashgrid/llama-cpp-vulkan)
#   PYTHONPATH=DEST python3 infer/tests/fixtures/make_llamacpp_fixture.py --vulkan \
#       "$HASHGRID_SMOLLM2" infer/tests/fixtures/smollm2_llamacpp_vulkan.json
#
# Needs Vulkan headers and glslc (Debian: libvulkan-dev glslc, installed here when missing)
# and Mesa's lavapipe (mesa-vulkan-drivers). About 6 minutes on two cores.
set -euo pipefail

VERSION=0.3.36
DEST="${1:-$HOME/.cache/hashgrid/llama-cpp-vulkan}"

if ! command -v glslc >/dev/null || [ ! -f /usr/include/vulkan/vulkan.hpp ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "==> installing Vulkan headers and glslc" >&2
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends libvulkan-dev glslc \
        mesa-vulkan-drivers >/dev/null
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "==> fetching llama-cpp-python $VERSION (source)" >&2
python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    -d "$work" "llama-cpp-python==$VERSION"
tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
src="$work/llama_cpp_python-$VERSION"

# Vulkan headers before 1.3.261 (Debian 12 ships 1.3.239) lack VK_EXT_layer_settings, which
# ggml-vulkan uses only to configure the validation layer: build without that block there.
if ! grep -rqs "struct LayerSettingEXT" /usr/include/vulkan/; then
    echo "==> Vulkan headers predate VK_EXT_layer_settings: leaving out the validation-layer settings" >&2
    python3 - "$src/vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
start = text.index("    VkBool32 enable_best_practice = layer_settings;")
tail = "extensions, &layer_setting_info);"
end = text.index(tail, start) + len(tail)
text = (text[:start] + "    (void)layer_settings;\n"
        "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, "
        "layers, extensions);" + text[end:])
open(path, "w").write(text)
EOF
fi

echo "==> building llama-cpp-python with the Vulkan backend into $DEST" >&2
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
CMAKE_ARGS="-DGGML_VULKAN=ON -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    python3 -m pip install --quiet --no-deps --target "$DEST" "$src"
python3 -m pip install --quiet --target "$DEST" numpy diskcache typing_extensions jinja2
echo "==> done: PYTHONPATH=$DEST" >&2
