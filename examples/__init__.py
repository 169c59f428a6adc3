"""Example tasks for `python -m tf_adamw.train` (see font_digits.py)."""
