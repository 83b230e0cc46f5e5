"""TextBrewer's module name for the registries: `cachebrew.registry` under the name TextBrewer scripts import.

The maps are the same objects, so ``cachebrew.presets.MATCH_LOSS_MAP['l1'] = ...`` registers for every config."""
from .registry import (ADAPTOR_KEYS, FEATURES, KD_LOSS_MAP, MAPS, MATCH_LOSS_MAP, PAIR_LOSSES, PROJ_MAP,
                       TEMPERATURE_SCHEDULER, WEIGHT_SCHEDULER, DynamicKeyDict, Registry, register_new, split_spec)

__all__ = ["ADAPTOR_KEYS", "FEATURES", "KD_LOSS_MAP", "MAPS", "MATCH_LOSS_MAP", "PAIR_LOSSES", "PROJ_MAP",
           "TEMPERATURE_SCHEDULER", "WEIGHT_SCHEDULER", "DynamicKeyDict", "Registry", "register_new", "split_spec"]
