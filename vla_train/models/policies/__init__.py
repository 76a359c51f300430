"""Policy families: one interface (`base.py`), one registry, a module per family (design/policies.md)."""
