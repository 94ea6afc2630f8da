"""Registers lowbit with transformers the moment `transformers.quantizers.auto` is imported.

A top-level module, not part of the `lowbit` package: importing `lowbit` imports torch and
transformers, which must not happen at interpreter start.

transformers has no plugin discovery: a checkpoint whose `quant_method` is unregistered loads with
randomly initialised Linear weights and only a warning. The `.pth` file that `pip install` puts in
site-packages calls `install()` at interpreter start, so any process that can import lowbit registers
it before the first `from_pretrained`. This module must stay cheap: it imports neither torch nor
transformers and does nothing until transformers itself is imported.
"""
import sys
import warnings

TARGET = "transformers.quantizers.auto"


def _register():
    try:
        from lowbit.registry import register_all

        register_all()
    except Exception as err:  # never break `import transformers` because of lowbit
        warnings.warn(f"lowbit could not register its quantizers with transformers: {err!r}", stacklevel=2)


class _RegisteringLoader:
    """Wraps the real loader of TARGET and registers lowbit right after the module has executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec else None
            if spec is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install():
    """Register now if transformers' quantizer registry is loaded, else as soon as it is."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
