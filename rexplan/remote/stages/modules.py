"""The end of every agent or relay run: serve the compiled modules (name, code) under their real
names, ahead of any rexplan installed on the host; the line shipping adds runs the entry."""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import CodeType, ModuleType
else:
    from _frozen_importlib import ModuleSpec  # loaded already: importlib.machinery costs 0.5 ms


# a meta-path finder and loader over the bundle's code; a package is the parent of another
# module (rexplan itself has no code here)
class _RexModules:
    def __init__(self, codes: "tuple[tuple[str, CodeType], ...]") -> None:
        self.codes = dict(codes)
        self.packages = {name.rpartition(".")[0] for name in self.codes} - {""}
        for name in list(self.packages):
            while "." in name:
                name = name.rpartition(".")[0]
                self.packages.add(name)

    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> "ModuleSpec | None":
        if name not in self.codes and name not in self.packages:
            return None
        return ModuleSpec(name, self, is_package=name in self.packages)  # type: ignore[arg-type]

    def create_module(self, spec: "ModuleSpec") -> None:
        return None

    def exec_module(self, module: "ModuleType") -> None:
        code = self.codes.get(module.__name__)
        if code is not None:
            module.__file__ = code.co_filename
            exec(code, module.__dict__)  # noqa: S102


def _rex_modules(codes: "tuple[tuple[str, CodeType], ...]") -> None:
    sys.meta_path.insert(0, _RexModules(codes))
