"""`python -m tf_adamw.train`: a custom-loop trainer for `tf_adamw.AdamW`.

Driven by the YAML files in `tpu_configs/`; see `config.py` for the keys.
"""
