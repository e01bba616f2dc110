"""The code's shape: no import cycles among the package's modules (counting imports inside
functions too), and the settings each command exposes come from one dataclass."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "freezeasguard"


def module_graph() -> dict[str, set[str]]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                if len(subs) < len(node.names) and target in mods:
                    graph[m].add(target)
                graph[m].update(subs)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
        graph[m].discard(m)
    return graph


def cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycle():
    assert cycles(module_graph()) == []


@pytest.mark.parametrize("command, cls", [("learn", "LearnConfig"), ("finetune", "FinetuneConfig"),
                                          ("protect", "ProtectSettings")])
def test_every_setting_of_a_command_is_a_flag_with_its_default(command, cls):
    from dataclasses import MISSING, fields

    from freezeasguard import cli
    from freezeasguard.training.finetune import FinetuneConfig
    from freezeasguard.guard.learn import LearnConfig
    from freezeasguard.methods import ProtectSettings
    from freezeasguard.settings import flag_name
    klass = {"LearnConfig": LearnConfig, "FinetuneConfig": FinetuneConfig, "ProtectSettings": ProtectSettings}[cls]
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    by_dest = {a.dest: a for a in sub._actions}
    for f in fields(klass):
        action = by_dest[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()
        assert action.default == (list(default) if isinstance(default, tuple) else default), f.name
        if f.type not in ("bool",):
            assert flag_name(f) in action.option_strings, f.name
