"""What is saved next to an adapter, and how it is read back."""

from __future__ import annotations

import pytest

from thoughtfold.config import AdapterConfig, CacheConfig
from thoughtfold.errors import ConfigError
from thoughtfold.persist import adapter_settings
from thoughtfold.policy import Policy


def test_adapter_settings_are_the_saved_ones_unless_given(tiny_dirs, tmp_path):
    adapter = AdapterConfig(mode="pte", rank=4, global_tokens=2)
    Policy.from_pretrained(str(tiny_dirs["llama"]), cache=CacheConfig(window=6, evict_ratio=0.5), adapter=adapter,
                           device="cpu").save_adapter(str(tmp_path / "ad"))
    saved = adapter_settings(tmp_path / "ad")
    assert saved == (adapter, CacheConfig(window=6, evict_ratio=0.5), str(tiny_dirs["llama"]))
    assert adapter_settings(tmp_path / "ad", window=8)[1] == CacheConfig(window=8, evict_ratio=0.5)
    assert adapter_settings(tmp_path / "ad", evict_ratio=0.25)[1] == CacheConfig(window=6, evict_ratio=0.25)
    assert adapter_settings(tmp_path / "ad", model="other", cache=CacheConfig())[1:] == (CacheConfig(), "other")
    with pytest.raises(ConfigError, match="not a thoughtfold adapter directory"):
        adapter_settings(tmp_path / "nope")
    loaded = Policy.from_pretrained(adapter_path=str(tmp_path / "ad"), cache=CacheConfig(window=4), device="cpu")
    assert (loaded.cache_config, loaded.adapter_config) == (CacheConfig(window=4), adapter)
