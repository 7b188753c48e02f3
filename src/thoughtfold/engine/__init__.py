"""The bounded-cache engine: cache, eviction, attention, encoder, fold, adapters, rollout, replay."""
