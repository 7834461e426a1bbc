"""Key sources, one file each, registered by name in registry.KEY_SOURCES (keys.KeySource
is the interface they fill)."""
