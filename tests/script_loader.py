"""Import a script of the repository (bench/*.py, examples/*.py) as a module, for tests of its functions."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str):
    """The module of ``ROOT/relative_path`` (e.g. ``"bench/compare_methods.py"``), executed afresh."""
    name = os.path.splitext(relative_path.replace(os.sep, "_").replace("/", "_"))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
