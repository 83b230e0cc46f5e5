"""The layout's rules, checked on the import graph (tests/architecture.py reads it from the source)."""
import architecture as arch
import pytest

KNOWN = arch.modules()
IMPORTS = arch.imports()


def deps(prefix):
    """(importing module, imported module, line) for every import made inside `prefix`."""
    return [(i.module, arch.resolve(i, KNOWN), i.line) for i in IMPORTS
            if i.module == prefix or i.module.startswith(prefix + ".")]


def inside(module, *prefixes):
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read():  # the rules below would pass on an empty graph
    assert len(KNOWN) > 40 and len(IMPORTS) > 150
    assert ("cachebrew.distill.run", "cachebrew.cache.loader") in {(m, t) for m, t, _ in deps("cachebrew.distill")}


def test_no_import_cycles_even_inside_functions():
    edges = {}
    for i in IMPORTS:
        target = arch.resolve(i, KNOWN)
        if target != i.module:
            edges.setdefault(i.module, set()).add(target)
    assert arch.cycles(edges) == []
    assert arch.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_crosses_a_module_boundary():
    crossing = [f"{i.module}:{i.line} imports {i.name} from {i.target}" for i in IMPORTS
                if i.name and i.name.startswith("_") and not i.name.startswith("__")]
    assert crossing == []


@pytest.mark.parametrize("phase, other", [("cachebrew.export", "cachebrew.distill"),
                                          ("cachebrew.distill", "cachebrew.export")])
def test_the_export_and_distill_phases_do_not_import_each_other(phase, other):
    assert [d for d in deps(phase) if inside(d[1], other)] == []


def test_the_cache_contract_knows_nothing_of_jobs_or_training():
    allowed = ("cachebrew.cache", "cachebrew.core", "cachebrew.errors")
    assert [d for d in deps("cachebrew.cache") if not inside(d[1], *allowed)] == []


def test_shared_components_depend_on_nothing_above_them():
    assert [d for d in deps("cachebrew.core") if not inside(d[1], "cachebrew.core", "cachebrew.errors")] == []
