"""``alcot export RUN --hf DIR``: a Hugging Face transformers model folder of a run.

The folder holds ``config.json`` (with ``auto_map`` to the remote code), ``model.safetensors``
(fp32 weights, tensor-parallel shards gathered, under the same names alcot uses),
``tokenizer.json`` with ``tokenizer_config.json``, ``generation_config.json``, and the
modeling code (``modeling_alcot.py``, ``configuration_alcot.py``, plain PyTorch, every method).
It loads with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(DIR)``, and lm-eval's ``hf`` model evaluates it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from alcot.common.typed import ConfigError

REMOTE = Path(__file__).resolve().parent / "hf_remote"
FILES = ("configuration_alcot.py", "modeling_alcot.py")

# TransformerEngine layers fuse the norm into the following linear: the same weight by another name
_TE_RENAMES = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
}


def hf_config(loaded) -> dict:
    m = loaded.model.cfg
    return {
        "model_type": "alcot",
        "architectures": ["AlcotForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_alcot.AlcotConfig",
            "AutoModelForCausalLM": "modeling_alcot.AlcotForCausalLM",
        },
        "method": m.method,
        "l_max": m.l_max,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "intermediate_size": m.ffn_hidden_size,
        "max_position_embeddings": m.max_seq_len,
        "rope_theta": float(m.rotary_base),
        "rms_norm_eps": m.norm_eps,
        "embed_scale": m.embed_scale,
        "mix": m.mix,
        "router": m.halting.router,
        "tau": m.halting.tau,
        "ponder_update": m.ponder_update,
        "mor_alpha": m.mor.alpha,
        "mor_threshold": m.mor.threshold,
        "context_length": loaded.seq_len,
        "eos_token_id": loaded.eos_id,
        "pad_token_id": loaded.eos_id,
        "bos_token_id": loaded.eos_id,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "alcot": {
            "run_dir": str(loaded.run_dir),
            "checkpoint": str(loaded.checkpoint.path),
            "step": loaded.checkpoint.step,
            "size": m.size,
        },
    }


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or name.endswith("_extra_state"):
            continue
        if name.startswith("rotary."):  # recomputed from rope_theta
            continue
        for old, new in _TE_RENAMES.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        out[name] = t.detach().to(torch.float32).contiguous().clone()
    return out


def export_hf(loaded, out_dir: Path, overwrite: bool = False) -> Path:
    """Write the model folder; returns it."""
    from safetensors.torch import save_file

    from alcot.data.tokenizer import EOS

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError("--hf", f"{out} exists and is not empty (use --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(loaded.model), str(out / "model.safetensors"), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(loaded), indent=1))
    (out / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": loaded.eos_id, "pad_token_id": loaded.eos_id, "use_cache": False},
            indent=1,
        )
    )
    loaded.tokenizer.save(str(out / "tokenizer.json"))
    special = {"eos_token": EOS, "bos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": loaded.seq_len,
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                **special,
            },
            indent=1,
        )
    )
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    for f in FILES:
        shutil.copyfile(REMOTE / f, out / f)
    return out
