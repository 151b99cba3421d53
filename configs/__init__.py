"""The YAML configs shipped with mebt (installed as the package data `mebt.configs`; see mebt.config.find_config)."""
