"""A toy target for tests/test_target_contract.py: everything a new target adds lives in this
folder, and one row of ``autoglm_export.targets.table.TARGETS`` registers it."""
