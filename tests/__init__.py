"""The test suite, a package: tests and their helpers import the helper modules as ``tests.<module>``."""
