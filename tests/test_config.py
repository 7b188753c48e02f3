"""Config validation: every bad setting is a ConfigError with a message naming the setting."""

from __future__ import annotations

import pytest

from thoughtfold import AdapterConfig, CacheConfig, ConfigError


@pytest.mark.parametrize("window,ratio,block", [(8, 0.25, 2), (10, 0.25, 3), (7, 1.0, 7), (12, 0.3, 4), (1, 0.25, 1),
                                                (100, 0.01, 1)])
def test_evict_block_is_ceil_of_ratio_times_window(window, ratio, block):
    assert CacheConfig(window=window, evict_ratio=ratio).evict_block == block


@pytest.mark.parametrize("kwargs,match", [
    ({"window": 0}, "window must be >= 1"),
    ({"window": -3}, "window must be >= 1"),
    ({"window": 2.5}, "window must be an integer"),
    ({"window": 8, "evict_ratio": 0.0}, "evict_ratio must be in"),
    ({"window": 8, "evict_ratio": 1.5}, "evict_ratio must be in"),
])
def test_bad_cache_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CacheConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "qlora"}, "adapter mode must be one of"),
    ({"rank": 0}, "rank must be"),
    ({"global_tokens": -1}, "global_tokens"),
    ({"state_update": "sum"}, "state_update"),
    ({"target_modules": ()}, "target_modules is empty"),
])
def test_bad_adapter_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdapterConfig(**kwargs)


def test_full_cache_has_no_eviction_block():
    assert not CacheConfig().bounded
    with pytest.raises(ConfigError):
        _ = CacheConfig().evict_block
