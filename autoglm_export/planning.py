"""Quantization planning for a whole model: every component's ``quantize.ComponentPlan`` from the
recipe's rules, built from module shapes alone (meta device: no weight is read), with every
rule problem of every component reported in one error."""

from __future__ import annotations

from .checkpoint import Checkpoint
from .components import Shapes
from .errors import RecipeError
from .load import build_on_meta
from .models import family_of
from .quantize import ComponentPlan, plan_component
from .recipe import Recipe


def plan_quantization(recipe: Recipe, ckpt: Checkpoint, shapes: Shapes, recipe_file: str) -> dict[str, ComponentPlan]:
    return plan_quantization_for_spec(recipe, ckpt.spec, shapes, recipe_file)


def plan_quantization_for_spec(recipe: Recipe, spec, shapes: Shapes, recipe_file: str) -> dict[str, ComponentPlan]:
    """Every component's plan from a model spec alone (modules built on meta: no weights needed)."""
    plans, problems = {}, []
    for comp in family_of(spec).components.for_spec(spec, shapes):
        meta = build_on_meta(lambda c=comp: c.build(spec, shapes))
        try:
            plans[comp.name] = plan_component(recipe, comp.rule_name, meta, recipe_file)
        except RecipeError as e:  # every component's problems in one error
            problems += e.problems
    if problems:
        raise RecipeError(recipe_file, problems)
    return plans
