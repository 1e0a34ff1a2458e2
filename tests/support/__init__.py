"""Helpers shared by the test modules (no test module imports another): paths, tolerances, the model card's
reference `load_video`, fakes, and the e2e server handle. `tests/conftest.py` puts `tests/` on sys.path."""
