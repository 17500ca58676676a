"""Configuration sources that feed the state store: the local YAML file (and later xDS)."""
