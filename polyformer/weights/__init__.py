"""Converters from reference implementations' weights to ours: one `convert_*` function per source."""
