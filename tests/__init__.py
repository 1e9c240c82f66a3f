"""The test suite: one package, so tests import their peers and harnesses as `tests.support.*`."""
