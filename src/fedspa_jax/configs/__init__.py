"""Config files shipped with fedspa-jax: `fedspa-jax run --config <name>` (see `fedspa_jax.config.load`).

Each module has `get_config(smoke=False) -> Config`; its docstring holds the command that runs it. `default` is
what `fedspa-jax run` runs without a config: the one place the built-in default experiment is defined.
"""
