"""The benchmark scripts (run each as `python bench/<name>.py`): a package so that the tests can
import the drivers they share with a script, as ``bench.overload``."""
