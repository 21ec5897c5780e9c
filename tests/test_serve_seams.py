"""The server's seams: its modules import one another without cycles, both backends implement the
interface the app talks to, and the request bodies documented in docs/serving.md are the models'."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from prefixtune.serve import protocol
from prefixtune.serve.backend import Backend
from prefixtune.serve.batcher import Batcher
from prefixtune.serve.ray_serve import RayBackend

SERVE = Path(__file__).parent.parent / "prefixtune" / "serve"


def _imports(path: Path) -> set[str]:
    """The ``prefixtune.serve`` modules ``path`` imports, at any depth of the file (a lazy import inside a
    function closes a cycle as surely as one at the top)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found.update(name.split(".")[0] for name in names)
    return {name for name in found if (SERVE / f"{name}.py").exists()}


def test_the_server_modules_import_one_another_without_a_cycle():
    graph = {path.stem: _imports(path) for path in SERVE.glob("*.py") if path.stem != "__init__"}
    done, path = set(), []

    def visit(module):
        if module in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for other in sorted(graph[module]):
            visit(other)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    for module in graph:
        importlib.import_module(f"prefixtune.serve.{module}")


@pytest.mark.parametrize("backend", [Batcher, RayBackend])
def test_both_backends_implement_every_member_of_the_interface(backend):
    members = [name for name in vars(Backend) if not name.startswith("_")] + list(Backend.__annotations__)
    for name in members:
        own = next((klass for klass in backend.__mro__ if name in vars(klass)), None)
        assigned = name in inspect.getsource(backend.__init__)  # attributes set on the instance
        assert (own is not None and own is not Backend) or assigned, f"{backend.__name__} lacks {name}"


def test_the_request_table_in_the_docs_is_generated_from_the_models():
    doc = (Path(__file__).parent.parent / "docs" / "serving.md").read_text()
    assert protocol.field_table() in doc, "regenerate it: python -c 'from prefixtune.serve import protocol; " \
                                          "print(protocol.field_table())'"


def test_openapi_describes_each_body():
    spec = protocol.openapi()
    schemas = spec["components"]["schemas"]
    assert set(schemas) >= {"CompletionRequest", "ChatRequest", "PrefixLoad"}
    assert schemas["CompletionRequest"]["properties"]["temperature"]["maximum"] == 2
    assert set(spec["paths"]) == set(protocol.BODIES)
