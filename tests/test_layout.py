"""The package's layers, read from its imports: a library below that imports no stage, stages that import
the library and never one another, apps on top; no circle of imports anywhere; no oversized module or stage
function. Reading the source with `ast` catches function-local imports too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "instructgpt"
STAGES = {"pretrain", "sft", "collect", "rm", "ppo", "dpo", "evaluate"}
APPS = {"cli", "pipeline", "chat_cli", "serve", "openai_api", "hf", "hf_export", "gguf", "report", "world.command"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """The package's own modules that `path` imports (relative or absolute, anywhere in the file)."""
    name = module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
                names = [target] if node.module else [".".join([*base, a.name]) for a in node.names]
            elif node.module and node.module.startswith("instructgpt"):
                names = [node.module.removeprefix("instructgpt").lstrip(".")]
            else:
                continue
            found.update(n for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("instructgpt.") for a in node.names if a.name.startswith("instructgpt."))
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_layers_are_known():
    modules = set(graph())
    assert STAGES <= modules and APPS <= modules


def test_the_library_imports_no_stage_and_no_app():
    for module, deps in graph().items():
        if module in STAGES or module in APPS:
            continue
        assert not deps & (STAGES | APPS), f"library module {module} imports {sorted(deps & (STAGES | APPS))}"


def test_no_stage_imports_another_stage_or_an_app():
    for module in STAGES:
        deps = graph()[module]
        assert not deps & (STAGES | APPS), f"stage {module} imports {sorted(deps & (STAGES | APPS))}"


def test_no_circle_of_imports():
    g = graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                raise AssertionError("circle of imports: " + " -> ".join([*path[path.index(d):], d]))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_the_import_reader_sees_imports():
    """The checks above would pass by reading nothing: the reader must find relative, absolute and
    function-local imports."""
    assert {"batching", "checkpoint", "train"} <= imports(PACKAGE / "sft.py")
    assert {"generate", "tokenizer"} <= imports(PACKAGE / "chat.py")
    assert {"errors", "world.labeler"} <= imports(PACKAGE / "world" / "judge.py")
def test_no_module_over_about_600_lines_and_no_stage_function_over_about_80():
    for path in PACKAGE.rglob("*.py"):
        n = len(path.read_text().splitlines())
        assert n <= 620, f"{path.name}: {n} lines"
    for stage in STAGES:
        tree = ast.parse((PACKAGE / f"{stage}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 85, f"{stage}.{node.name}: {length} lines"
