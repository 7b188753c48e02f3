"""Model loading: local directories of every supported family, the bundled default model (GGUF ->
cached safetensors), typed errors for bad paths / offline hub ids / unsupported architectures, and
prompt encoding with and without the chat template."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAMILIES, assert_close_to_scale, byte_tokenizer, make_tiny_model_dir, tiny_config
from thoughtfold.errors import ConfigError, ModelLoadError, UnsupportedArchitectureError
from thoughtfold.models import (
    SUPPORTED_MODEL_TYPES,
    default_model_dir,
    load_model,
    max_positions,
    resolve_dtype,
)
from thoughtfold.prompts import encode_prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_load_local_dir_each_family(tiny_dirs, family):
    model, tok = load_model(str(tiny_dirs[family]))
    assert model.config.model_type == family
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert tok.pad_token_id is not None
    assert max_positions(model) == 512
    # the weights are the saved ones, not a fresh init
    saved = load_file(str(tiny_dirs[family] / "model.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_load_pathlike_and_dtype(tiny_dirs):
    model, _ = load_model(tiny_dirs["qwen2"], dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    model, _ = load_model(tiny_dirs["qwen2"], dtype=torch.float16)
    assert model.dtype == torch.float16


def test_bad_dtype_and_device(tiny_dirs):
    with pytest.raises(ConfigError, match="dtype"):
        load_model(str(tiny_dirs["llama"]), dtype="float8")
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype(torch.int64, torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model(str(tiny_dirs["llama"]), device="cuda")
    with pytest.raises(ConfigError, match="device"):
        load_model(str(tiny_dirs["llama"]), device="tpu-please")


def test_pad_token_falls_back_to_eos(tmp_path):
    from transformers import AutoTokenizer

    from conftest import make_tiny_model_dir

    d = make_tiny_model_dir("llama", tmp_path / "nopad")
    tok = AutoTokenizer.from_pretrained(d)
    tok.pad_token = None
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok = load_model(str(d))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"


# --------------------------------------------------------------------------- unsupported architectures


def test_unsupported_architecture_saved_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=259, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    byte_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(str(tmp_path / "gpt2"))
    msg = str(info.value)
    assert "'gpt2'" in msg
    for t in SUPPORTED_MODEL_TYPES:
        assert t in msg
    assert "\n" not in msg


def test_unsupported_architecture_checked_before_weights(tmp_path):
    """A config-only directory (no weights, no tokenizer): the architecture error comes first."""
    from transformers import MistralConfig

    d = tmp_path / "mistral"
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config.save_pretrained(d)
    assert not list(d.glob("*.safetensors"))
    with pytest.raises(UnsupportedArchitectureError, match="'mistral'"):
        load_model(str(d))


def test_unknown_model_type_is_unsupported(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "frobnicator", "architectures": ["X"]}))
    with pytest.raises(UnsupportedArchitectureError, match="frobnicator"):
        load_model(str(d))


# --------------------------------------------------------------------------- load errors


@pytest.mark.parametrize("bad", ["./no/such/dir", "/definitely/not/here", "~/nope-thoughtfold-x"])
def test_missing_local_path(bad):
    with pytest.raises(ModelLoadError) as info:
        load_model(bad)
    msg = str(info.value)
    assert repr(bad) in msg and "no such local directory" in msg and "\n" not in msg


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(f))


def test_offline_hub_id():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ModelLoadError) as info:
        load_model("thoughtfold-test/definitely-not-a-model")
    msg = str(info.value)
    assert "'thoughtfold-test/definitely-not-a-model'" in msg
    assert "could not be reached" in msg and "'default'" in msg and "\n" not in msg


def test_invalid_hub_id():
    with pytest.raises(ModelLoadError, match="not a valid hub id"):
        load_model("not a valid id!!")


def test_model_load_error_is_os_error():
    """Callers that catch OSError (as with transformers) still catch ours."""
    with pytest.raises(OSError):
        load_model("/definitely/not/here")


# --------------------------------------------------------------------------- prompts


# --------------------------------------------------------------------------- the default model


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory):
    """A fresh THOUGHTFOLD_CACHE for the session, so the GGUF conversion is exercised (once)."""
    root = tmp_path_factory.mktemp("tfcache")
    old = os.environ.get("THOUGHTFOLD_CACHE")
    os.environ["THOUGHTFOLD_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("THOUGHTFOLD_CACHE", None)
    else:
        os.environ["THOUGHTFOLD_CACHE"] = old


def test_default_model_converts_once_then_loads_from_cache(default_cache):
    target = default_model_dir(convert=False)
    assert target == Path(default_cache) / "models" / "smollm2-135m-instruct"
    assert not target.exists()

    model, tok = load_model("default")
    weights = target / "model.safetensors"
    assert weights.is_file() and (target / "config.json").is_file()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp")]  # temp dir renamed away
    stamp = (weights.stat().st_mtime_ns, weights.stat().st_ino)

    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not model.training and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.chat_template and tok.pad_token_id is not None
    assert max_positions(model) == 8192

    model2, _ = load_model("default")
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == stamp  # not converted again
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_default_model_is_a_working_instruct_model(default_cache):
    model, tok = load_model("default")
    ids = encode_prompt(tok, "What is the capital of France?")
    text = tok.decode(ids)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):])


# --------------------------------------------------------------------------- RoPE: exact or refused

# what each rope type needs beyond rope_theta for a 512-position model (scaling past 128 positions)
ROPE_CASES = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 128},
    "longrope": {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                 "original_max_position_embeddings": 128},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128},
    "proportional": {"partial_rotary_factor": 0.5},
}
LENGTH_DEPENDENT = {"dynamic", "longrope"}


def test_rope_cases_cover_every_type_transformers_offers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert set(ROPE_INIT_FUNCTIONS) | {"default"} == set(ROPE_CASES)


@pytest.mark.parametrize("rope_type", sorted(ROPE_CASES))
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_every_rope_type_derotates_exactly_or_is_refused(tmp_path, family, rope_type):
    """The keys the model caches, de-rotated as the folder does (the rotary at the keys'
    positions, past the original context where the scaled types differ), are the keys before
    rotation; types whose frequencies follow the sequence length are refused at load."""
    from transformers import DynamicCache

    from thoughtfold.engine.cache import cache_kwarg
    from thoughtfold.engine.encoder import derotate_keys
    from thoughtfold.engine.fold import StateFolder

    rope = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_CASES[rope_type]}
    path = make_tiny_model_dir(family, tmp_path / rope_type, rope_parameters=rope)
    if rope_type in LENGTH_DEPENDENT:
        with pytest.raises(UnsupportedArchitectureError, match=f"rope_type '{rope_type}'.*sequence length"):
            load_model(str(path))
        return
    model, _ = load_model(str(path), dtype="float32", device="cpu")
    attn = model.model.layers[0].self_attn
    raw: list[torch.Tensor] = []
    keys = attn.k_norm if family == "qwen3" else attn.k_proj
    hook = keys.register_forward_hook(lambda m, i, o: raw.append(o))
    positions = torch.arange(300, 340)[None]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 250, (1, 40)), position_ids=positions, use_cache=True,
              **{cache_kwarg(model): cache})
    hook.remove()
    cached = cache.layers[0].keys  # [1, kv_heads, 40, head_dim], rotated
    before = raw[0].reshape(1, 40, -1, cached.shape[-1]).transpose(1, 2)
    cos, sin = StateFolder(model, [], None).rotary(cached.new_empty(0), positions)
    assert_close_to_scale(derotate_keys(cached, cos, sin), before, rel=1e-5)
    assert (cached - before).abs().max() > 0.1  # the keys really were rotated


@pytest.mark.parametrize("rope_type", ["linear", "yarn", "llama3"])
def test_partial_rotary_with_scaled_rope_is_refused(tmp_path, rope_type):
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            **ROPE_CASES[rope_type]}
    path = make_tiny_model_dir("llama", tmp_path / rope_type, rope_parameters=rope)
    with pytest.raises(UnsupportedArchitectureError, match="partial_rotary_factor 0.5"):
        load_model(str(path))


def test_legacy_rope_scaling_and_model_objects_are_checked_too(tmp_path):
    from transformers import AutoModelForCausalLM

    from thoughtfold.models import check_rope
    from thoughtfold.policy import Policy

    with pytest.raises(UnsupportedArchitectureError, match="rope_type 'dynamic'"):
        check_rope("old", {"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(UnsupportedArchitectureError,
                       match="rope_type 'ntk', which thoughtfold has not validated"):
        check_rope("new", {"model_type": "llama", "rope_parameters": {"rope_type": "ntk"}})
    check_rope("qwen2.5", {"model_type": "qwen2", "rope_scaling": None})
    cfg = tiny_config("llama", rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                **ROPE_CASES["longrope"]})
    with pytest.raises(UnsupportedArchitectureError, match="rope_type 'longrope'"):
        Policy(AutoModelForCausalLM.from_config(cfg), byte_tokenizer())
