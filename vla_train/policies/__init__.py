"""Policy families behind one interface (`base.py`): each turns frames into model inputs, computes its loss
through the model and owns its metrics; the trainer never branches on the family (shared/design/policies.md)."""
