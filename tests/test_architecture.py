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
    assert ("cachebrew.recipes.distill.recipe", "cachebrew.components.loader") in {(m, t) for m, t, _ in deps("cachebrew.recipes.distill")}


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


RECIPES = ("cachebrew.recipes.export", "cachebrew.recipes.distill", "cachebrew.recipes.finetune")
TEXTBREWER = tuple(f"cachebrew.{m}" for m in ("configurations", "registry", "losses", "schedulers", "projections",
                                               "parameters", "augment", "objective", "distillers",
                                               "presets", "utils", "data_utils"))
# TextBrewer's module names kept for TextBrewer scripts: each re-exports from the module named for what it holds
COMPAT_NAMES = ("cachebrew.presets", "cachebrew.utils", "cachebrew.data_utils")


@pytest.mark.parametrize("recipe", RECIPES)
def test_no_recipe_imports_another(recipe):
    """export and distill meet only in the cache; finetune shares components with both, never their code."""
    others = [r for r in RECIPES if r != recipe]
    assert [d for d in deps(recipe) if inside(d[1], *others)] == []


def test_the_cache_contract_knows_nothing_of_jobs_or_training():
    allowed = ("cachebrew.cache", "cachebrew.core", "cachebrew.errors")
    assert [d for d in deps("cachebrew.cache") if not inside(d[1], *allowed)] == []


def test_core_depends_on_nothing_above_it():
    allowed = ("cachebrew.core", "cachebrew.errors", "cachebrew.version")
    assert [d for d in deps("cachebrew.core") if not inside(d[1], *allowed)] == []


def test_textbrewer_modules_know_nothing_of_caches_jobs_or_front_ends():
    """TextBrewer's names (configs, losses, distillers) stand on core alone: a TextBrewer script needs no cache."""
    allowed = (*TEXTBREWER, "cachebrew.core", "cachebrew.errors", "cachebrew.version")
    found = [d for m in TEXTBREWER for d in deps(m) if not inside(d[1], *allowed)]
    assert found == []


def test_components_serve_recipes_and_front_ends_but_import_none():
    forbidden = (*RECIPES, "cachebrew.hf", "cachebrew.inc", "cachebrew.cli", "cachebrew.distillers")
    assert [d for d in deps("cachebrew.components") if inside(d[1], *forbidden)] == []


@pytest.mark.parametrize("front_end", ["cachebrew.hf", "cachebrew.inc"])
def test_front_ends_use_components_not_recipes(front_end):
    assert [d for d in deps(front_end) if inside(d[1], *RECIPES, "cachebrew.cli")] == []


def test_hf_knows_nothing_of_the_intel_front_end_built_on_it():
    assert [d for d in deps("cachebrew.hf") if inside(d[1], "cachebrew.inc")] == []


def test_textbrewer_module_names_are_for_users_only():
    """Inside cachebrew, code imports `registry`, `augment`, `parameters`: `presets`, `utils`, `data_utils` are
    TextBrewer's names, kept as re-exports so that TextBrewer scripts run unchanged."""
    users = [(m, t, line) for m, t, line in deps("cachebrew") if inside(t, *COMPAT_NAMES) and m not in COMPAT_NAMES]
    assert users == []
    import cachebrew.augment, cachebrew.data_utils, cachebrew.presets, cachebrew.registry  # noqa: E401
    assert cachebrew.presets.MATCH_LOSS_MAP is cachebrew.registry.MATCH_LOSS_MAP  # one registry, two names
    assert cachebrew.data_utils.masking is cachebrew.augment.masking


ROOT = arch.PACKAGE.parent
STUDY = ROOT / "pipelines" / "study"


def test_nothing_outside_the_study_imports_it():
    """The study is a pipeline on top of cachebrew: no package module, other pipeline, benchmark or example uses it."""
    import ast

    users = []
    for folder in ("cachebrew", "pipelines", "benchmarks", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            if STUDY in path.parents:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                users += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.startswith("pipelines.study")]
    assert users == []


def test_the_study_imports_only_names_cachebrew_exports():
    """What the study imports from cachebrew is in the `__all__` of the module it names or of its nearest package
    that has one (a recipe's internals, e.g. `recipes.distill.recipe.evaluate`, are not): a reorganisation inside
    a package cannot break the study silently."""
    found = arch.imports(STUDY.rglob("*.py"), root=ROOT)
    assert len(found) >= 10  # the rule below would pass on nothing
    bad = []
    for i in found:
        if i.name is None:
            continue
        chain = [i.target] + [i.target.rsplit(".", k)[0] for k in range(1, i.target.count("."))]
        declared = next((names for names in map(arch.exported_names, chain) if names is not None), None)
        if i.name.startswith("_") or (declared is not None and i.name not in declared):
            bad.append(f"{i.module}:{i.line} imports {i.name} from {i.target}")
    assert bad == []
