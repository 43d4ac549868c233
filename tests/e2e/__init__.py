"""End-to-end tests: the real CLI on a real cluster. A package, so that its conftest.py does not shadow tests/conftest.py (`from conftest import ...`)."""
