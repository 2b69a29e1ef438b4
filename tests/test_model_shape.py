"""Model shapes and exact parameter counts, checked against transformers on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.model_shape import (
    CATALOG_HUB_IDS,
    ModelShapeError,
    catalog_config,
    catalog_names,
    count_params,
    load_model_shape,
    shape_from_config,
)


def _meta_count(config: dict) -> tuple[int, int]:
    """(total, largest tensor) of the config instantiated by transformers on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    params = list(model.parameters())  # shared (tied) parameters are listed once
    return sum(p.numel() for p in params), max(p.numel() for p in params)


def test_catalog_has_every_family_in_the_design():
    names = set(catalog_names())
    assert set(CATALOG_HUB_IDS) == names
    for required in ("llama-3.1-8b", "qwen2.5-0.5b", "mistral-7b-v0.3", "gpt2", "mixtral-8x7b",
                     "gemma-2-9b", "phi-3-mini", "phi-4", "qwen2.5-72b", "llama-3.1-70b"):
        assert required in names


@pytest.mark.parametrize("name", catalog_names())
def test_param_count_matches_transformers_on_meta_device(name):
    config = catalog_config(name)
    shape = shape_from_config(config, name=name)
    counted = count_params(shape)
    assert counted.exact
    total, largest = _meta_count(config)
    assert counted.total == total, f"{name}: zerotune {counted.total:,} vs transformers {total:,}"
    assert counted.largest_tensor == largest


@pytest.mark.parametrize(
    "config",
    [
        # Small shapes that exercise switches the catalog does not: biases, untied GPT-2,
        # MoE with Qwen3's q/k norms, Gemma 1.
        {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
         "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
        {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 3, "vocab_size": 500,
         "n_positions": 128, "n_inner": 96, "tie_word_embeddings": False},
        {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 300,
         "tie_word_embeddings": True},
        {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300},
        {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
         "num_local_experts": 4, "num_experts_per_tok": 2},
    ],
    ids=["llama-biases", "gpt2-untied", "qwen3", "gemma", "mixtral-tiny"],
)
def test_param_count_of_small_configs(config):
    shape = shape_from_config(config)
    total, largest = _meta_count(config)
    counted = count_params(shape)
    assert counted.total == total
    assert counted.largest_tensor == largest


def test_breakdown_of_llama_3_1_8b():
    shape = load_model_shape("llama-3.1-8b")
    c = count_params(shape)
    assert c.total == 8_030_261_248
    assert c.embeddings == c.lm_head == 128256 * 4096
    assert c.by_layer_kind["attention"] == 4096 * 4096 * 2 + 2 * 4096 * 1024
    assert shape.num_kv_heads == 8 and shape.head_dim == 128
    assert not shape.tie_word_embeddings


def test_moe_active_params():
    c = count_params(load_model_shape("mixtral-8x7b"))
    assert 46e9 < c.total < 47e9
    assert 12.5e9 < c.active < 13.5e9


def test_load_by_path_hub_id_and_catalog(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(catalog_config("qwen2.5-0.5b")))
    by_dir = load_model_shape(str(tmp_path))
    by_file = load_model_shape(str(tmp_path / "config.json"))
    by_name = load_model_shape("Qwen2.5-0.5B")
    by_hub_id = load_model_shape("Qwen/Qwen2.5-0.5B")  # in the catalog: no network needed
    assert by_dir.hidden_size == by_file.hidden_size == by_name.hidden_size == 896
    assert by_hub_id.vocab_size == 151936 and by_hub_id.tie_word_embeddings


def test_unknown_names_fail_clearly(tmp_path):
    with pytest.raises(ModelShapeError, match=r"Did you mean 'llama-3\.1-8b'"):
        load_model_shape("llama-3.1-8")
    with pytest.raises(ModelShapeError, match=r"no config\.json"):
        load_model_shape(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelShapeError, match="not valid JSON"):
        load_model_shape(str(bad))


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelShapeError, match=r"could not fetch config\.json"):
        load_model_shape("nobody-here/no-such-model-zt")


def test_importing_model_shape_does_not_import_torch():
    code = ("import sys, engine.model_shape as m; m.count_params(m.load_model_shape('gpt2'));"
            "print(any(k in sys.modules for k in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
